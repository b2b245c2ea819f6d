"""Times the `nas bench` networks in Keras 3 on TensorFlow (CPU), for a side-by-side run.

Prints one JSON object per network with the same keys as `nas bench --json`:
train_images_per_s (one step: forward, backward, plain SGD update, after one warm-up
step), infer_images_per_s and peak_rss_mib.

    pip install tensorflow-cpu keras   # outside the repository
    python keras_reference.py small 64 5
    python keras_reference.py mobile 32 2

Run `nas bench` right after it on the same machine, and compare ratios, not absolutes.
"""

import json
import os
import resource
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402


def build(net):
    if net == "small":
        # `NASNet` itself is not exported by keras.applications in Keras 3.
        from keras.src.applications.nasnet import NASNet

        model = NASNet(
            input_shape=(32, 32, 3), penultimate_filters=384, num_blocks=2, stem_block_filters=32,
            skip_reduction=False, filter_multiplier=2, classes=10, weights=None, include_top=True)
        return model, 32, 10
    if net == "mobile":
        return keras.applications.NASNetMobile(weights=None), 224, 1000
    raise SystemExit(f"unknown network {net}")


def main():
    net = sys.argv[1] if len(sys.argv) > 1 else "small"
    batch = int(sys.argv[2]) if len(sys.argv) > 2 else (64 if net == "small" else 32)
    steps = int(sys.argv[3]) if len(sys.argv) > 3 else 5
    model, size, classes = build(net)
    rng = np.random.default_rng(1)
    xs = tf.constant(rng.uniform(-1, 1, (batch, size, size, 3)).astype("float32"))
    ys = tf.constant((np.arange(batch) * 7) % classes)
    opt = keras.optimizers.SGD(0.01)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=False)

    @tf.function
    def train_step():
        with tf.GradientTape() as tape:
            loss = loss_fn(ys, model(xs, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    @tf.function
    def infer():
        return model(xs, training=False)

    train_step()
    start = time.perf_counter()
    for _ in range(steps):
        train_step()
    train_s = (time.perf_counter() - start) / steps
    infer()
    start = time.perf_counter()
    for _ in range(steps):
        infer()
    infer_s = (time.perf_counter() - start) / steps
    print(json.dumps({
        "net": net,
        "batch": batch,
        "steps": steps,
        "params_total": int(model.count_params()),
        "train_images_per_s": batch / train_s,
        "infer_images_per_s": batch / infer_s,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
    }))


if __name__ == "__main__":
    main()
