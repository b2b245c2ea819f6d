"""Times timm's NASNet-A Large at a given width beside `nas bench` (scripts/gpu-check).

One training step (forward, backward, plain SGD update, cross-entropy on fixed labels) and
one eval-mode inference pass, after one warm-up step, the way `nas bench` times them; prints
one JSON object with the same keys. Needs torch and timm.

    python3 scripts/torch_bench.py --num-features 1056 --stem-size 32 --image 224 --batch 64
"""

import argparse
import json
import time

import timm
import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--num-features", type=int, default=1056)
    p.add_argument("--stem-size", type=int, default=32)
    p.add_argument("--image", type=int, default=224)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--device", default="cuda")
    a = p.parse_args()

    dev = torch.device(a.device)
    model = timm.create_model(
        "nasnetalarge", pretrained=False, num_classes=a.classes, num_features=a.num_features, stem_size=a.stem_size
    ).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(1)
    xs = (torch.rand(a.batch, 3, a.image, a.image, generator=g) * 2 - 1).to(dev)
    labels = (torch.arange(a.batch) * 7 % a.classes).to(dev)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def train_step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(xs), labels)
        loss.backward()
        opt.step()

    model.train()
    train_step()
    sync()
    start = time.perf_counter()
    for _ in range(a.steps):
        train_step()
    sync()
    train_s = (time.perf_counter() - start) / a.steps

    model.eval()
    with torch.no_grad():
        model(xs)
        sync()
        start = time.perf_counter()
        for _ in range(a.steps):
            model(xs)
        sync()
    infer_s = (time.perf_counter() - start) / a.steps

    print(
        json.dumps(
            {
                "framework": f"torch {torch.__version__}, timm {timm.__version__}",
                "net": f"nasnetalarge num_features={a.num_features} stem_size={a.stem_size}",
                "batch": a.batch,
                "image_size": a.image,
                "params_total": sum(p.numel() for p in model.parameters()),
                "train_step_s": train_s,
                "train_images_per_s": a.batch / train_s,
                "infer_images_per_s": a.batch / infer_s,
                "peak_gpu_mib": torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None,
                "device": str(dev),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
