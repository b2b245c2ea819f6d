//! End-to-end tests of the `nas` binary.

use std::process::{Command, Output};

fn nas(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nas")).args(args).output().expect("runs the nas binary")
}

fn stdout_of(args: &[&str]) -> String {
    let out = nas(args);
    assert!(out.status.success(), "nas {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn json_of(args: &[&str]) -> serde_json::Value {
    serde_json::from_str(&stdout_of(args)).expect("one JSON object")
}

#[test]
fn cost_json_for_the_three_presets() {
    let mobile = json_of(&["cost", "--cell", "nasnet-a", "--net", "mobile", "--json"]);
    assert_eq!(mobile["params_trainable"], 5_289_978);
    assert_eq!(mobile["params_total"], 5_326_716);
    assert_eq!(mobile["net"]["image_size"], 224);
    assert_eq!(mobile["net"]["num_classes"], 1000);
    let mult_adds = mobile["mult_adds"].as_u64().unwrap() as f64;
    assert!((mult_adds / 564e6 - 1.0).abs() < 0.005);

    let large = json_of(&["cost", "--cell", "nasnet-a", "--net", "large", "--json"]);
    assert_eq!(large["params_trainable"], 88_753_150);
    assert_eq!(large["params_total"], 88_949_818);
    assert_eq!(large["net"]["image_size"], 331);

    let cifar = json_of(&["cost", "--net", "cifar", "--json"]);
    assert_eq!(cifar["params_trainable"], 3_346_538);
    assert_eq!(cifar["net"]["num_classes"], 10);
}

#[test]
fn cost_overrides_and_n_at_p() {
    let v = json_of(&["cost", "--net", "4@1056", "--classes", "1001", "--json"]);
    assert_eq!(v["params_trainable"], 5_291_035);
    let v = json_of(&["cost", "--net", "cifar:2@384", "--image", "32", "--json", "--layers"]);
    assert_eq!(v["net"]["n"], 2);
    assert_eq!(v["net"]["num_conv_filters"], 16);
    let parts = v["parts"].as_array().unwrap();
    assert_eq!(parts.len(), 1 + 6 + 2 + 1); // stem conv, 6 normal, 2 reduction, head
    let sum: u64 = parts.iter().map(|p| p["params_trainable"].as_u64().unwrap()).sum();
    assert_eq!(sum, v["params_trainable"].as_u64().unwrap());
    let text = stdout_of(&["cost", "--net", "mobile"]);
    assert!(text.contains("5,289,978 trainable"), "{text}");
    assert!(text.contains("564M mult-adds (Table 3)"), "{text}");
}

#[test]
fn show_round_trips_through_files() {
    let dir = std::env::temp_dir().join(format!("nas-cli-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (format, name) in [("text", "a.cell"), ("json", "a.json")] {
        let path = dir.join(name);
        stdout_of(&["show", "--cell", "nasnet-a", "--format", format, "--out", path.to_str().unwrap()]);
        let again = stdout_of(&["show", "--cell", path.to_str().unwrap()]);
        assert_eq!(again, stdout_of(&["show", "--cell", "nasnet-a"]));
    }
    let dot = stdout_of(&["show", "--format", "dot"]);
    assert!(dot.starts_with("digraph"), "{dot}");
    let svg = stdout_of(&["show", "--format", "svg"]);
    assert!(svg.contains("<svg") && svg.contains("sep 7x7"), "{}", &svg[..200.min(svg.len())]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_cells_give_clear_errors() {
    let dir = std::env::temp_dir().join(format!("nas-cli-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.cell");
    let text = stdout_of(&["show"]).replace("h5 = add(identity(h3)", "h5 = add(identity(h9)");
    std::fs::write(&path, text).unwrap();
    let out = nas(&["show", "--cell", path.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("bad.cell"), "{err}");
    assert!(err.contains("reduction cell, block 3: left input 9 is out of range"), "{err}");
    assert!(err.contains("line 16, column 21"), "{err}");
    assert_eq!(err.matches("out of range").count(), 1, "{err}");

    let out = nas(&["show", "--cell", "nasnet-b"]);
    assert!(!out.status.success());
    assert!(String::from_utf8(out.stderr).unwrap().contains("Figure 8"));
    let out = nas(&["cost", "--net", "5@1538"]);
    assert!(String::from_utf8(out.stderr).unwrap().contains("nearest: 1536"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn random_and_stdin_cells() {
    let a = stdout_of(&["show", "--cell", "random:7", "--format", "json"]);
    assert_eq!(a, stdout_of(&["show", "--cell", "random:7", "--format", "json"]));
    assert_ne!(a, stdout_of(&["show", "--cell", "random:8", "--format", "json"]));
    assert!(a.contains(r#""output": "unused""#), "{a}");
    let mut child = Command::new(env!("CARGO_BIN_EXE_nas"))
        .args(["cost", "--cell", "-", "--net", "cifar", "--json"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    child.stdin.take().unwrap().write_all(a.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["params_trainable"].as_u64().unwrap() > 0);
    assert!(!nas(&["show", "--cell", "random:x"]).status.success());
}

#[test]
fn space_size() {
    let v = json_of(&["space", "--json"]);
    assert_eq!(v["num_actions"], 50);
    let per_cell: u128 = v["cell_action_sequences"].as_str().unwrap().parse().unwrap();
    assert_eq!(per_cell, 720u128.pow(2) * 13u128.pow(10) * 2u128.pow(5));
    let v = json_of(&["space", "--blocks", "2", "--json"]);
    assert_eq!(v["choices_per_step"].as_array().unwrap().len(), 20);
    assert!(stdout_of(&["space"]).contains("decisions per spec          50"));
    assert!(!nas(&["space", "--blocks", "0"]).status.success());
}

/// `nas infer` on the timm fixture of `nas-ops` (see `nas-ops/tests/fixtures/gen_timm_small.py`):
/// the logits it writes equal timm's.
#[test]
fn infer_matches_timm_logits() {
    use candle_core::{Device, Tensor};
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/../nas-ops/tests/fixtures/timm_small.safetensors");
    let mut tensors = candle_core::safetensors::load(fixture, &Device::Cpu).unwrap();
    let input = tensors.remove("__input__").unwrap();
    let expected = tensors.remove("__logits__").unwrap();
    let dir = std::env::temp_dir().join(format!("nas-cli-infer-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let weights = dir.join("w.safetensors");
    candle_core::safetensors::save(&tensors, &weights).unwrap();
    let x = dir.join("x.npy");
    input.write_npy(&x).unwrap();
    let y = dir.join("y.npy");
    let args = [
        "infer",
        "--timm-checkpoint",
        weights.to_str().unwrap(),
        "--net",
        "large",
        "--num-features",
        "384",
        "--stem-size",
        "32",
        "--classes",
        "10",
        "--input",
        x.to_str().unwrap(),
        "--logits-out",
        y.to_str().unwrap(),
    ];
    let text = stdout_of(&args);
    assert!(text.contains("wrote logits [2, 10]"), "{text}");
    let logits = Tensor::read_npy(&y).unwrap();
    let diff = (logits - &expected).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(diff < 1e-4, "max difference {diff}");

    // The wrong width is refused with the names of the tensors that do not fit.
    let out = nas(&[&args[..5], &["--num-features", "768"], &args[7..]].concat());
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("wrong shape") && err.contains("last_linear.weight"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bench_small_prints_its_figures() {
    let v = json_of(&["bench", "--net", "small", "--batch", "2", "--steps", "1", "--json"]);
    assert_eq!(v["params_total"], 373_558);
    assert!(v["train_images_per_s"].as_f64().unwrap() > 0.0);
    assert!(v["infer_images_per_s"].as_f64().unwrap() > 0.0);
    assert!(v["peak_rss_mib"].as_f64().unwrap() > 1.0);
    assert!(!nas(&["bench", "--net", "huge"]).status.success());
}

#[test]
fn infer_classifies_a_picture() {
    use candle_core::Device;
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/../nas-ops/tests/fixtures/timm_small.safetensors");
    let mut tensors = candle_core::safetensors::load(fixture, &Device::Cpu).unwrap();
    tensors.remove("__input__");
    tensors.remove("__logits__");
    let dir = std::env::temp_dir().join(format!("nas-cli-picture-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let weights = dir.join("w.safetensors");
    candle_core::safetensors::save(&tensors, &weights).unwrap();
    let data = nas_data::SyntheticConfig::new(1).train_test(10, 10);
    nas_data::write_imagenet_folder(dir.join("pics"), &data.train, &data.test, 80).unwrap();
    let picture = std::fs::read_dir(dir.join("pics/val/00_disc")).unwrap().next().unwrap().unwrap().path();
    let labels = dir.join("labels.txt");
    std::fs::write(&labels, (0..10).map(|i| format!("class {i}\n")).collect::<String>()).unwrap();
    let text = stdout_of(&[
        "infer",
        "--weights",
        weights.to_str().unwrap(),
        "--num-features",
        "384",
        "--stem-size",
        "32",
        "--classes",
        "10",
        "--image",
        picture.to_str().unwrap(),
        "--image-size",
        "64",
        "--labels",
        labels.to_str().unwrap(),
    ]);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "image 0:", "{text}");
    assert_eq!(lines.len(), 6, "{text}");
    let total: f64 = lines[1..]
        .iter()
        .map(|l| l.split_whitespace().nth(1).unwrap().trim_end_matches('%').parse::<f64>().unwrap())
        .sum();
    assert!(total > 0.0 && total <= 100.001, "{text}");
    assert!(lines[1].contains("class "), "{text}");

    // `nas predict` with timm's weights and a class-name file, for several pictures.
    let text = stdout_of(&[
        "predict",
        "--timm-checkpoint",
        weights.to_str().unwrap(),
        "--labels",
        labels.to_str().unwrap(),
        "--num-features",
        "384",
        "--stem-size",
        "32",
        "--image-size",
        "64",
        "--image",
        picture.to_str().unwrap(),
        picture.to_str().unwrap(),
    ]);
    assert_eq!(text.lines().filter(|l| l.ends_with(".JPEG:")).count(), 2, "{text}");
    assert_eq!(text.lines().filter(|l| l.contains("% ") && l.contains("class ")).count(), 10, "{text}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `nas train` on the built-in data writes a run directory; `nas eval` reads it back and
/// measures what the run's report says; a second `nas train` into it is refused, and
/// `--resume` of a finished run changes no step.
#[test]
fn train_eval_and_resume_a_tiny_run() {
    let dir = std::env::temp_dir().join(format!("nas-cli-train-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let d = dir.to_str().unwrap();
    let args = [
        "train",
        "--data",
        "synthetic:96:40",
        "--recipe",
        "search-child",
        "--net",
        "cifar:1@24",
        "--epochs",
        "1",
        "--batch",
        "16",
        "--out",
        d,
        "--progress",
        "plain",
    ];
    let text = stdout_of(&args);
    assert!(text.contains("5 steps"), "{text}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap()).unwrap();
    let eval = json_of(&["eval", "--checkpoint", d, "--split", "validation", "--json"]);
    assert_eq!(eval["metrics"]["top1"], report["final_eval"]["top1"]);
    assert_eq!(eval["metrics"]["images"], 10);
    let test = json_of(&["eval", "--checkpoint", d, "--json"]);
    assert_eq!(test["metrics"]["images"], 40);

    let again = nas(&args);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already holds a run"));
    let resumed = stdout_of(&["train", "--resume", "--out", d, "--progress", "quiet"]);
    assert!(resumed.contains("5 steps"), "{resumed}");

    let fresh = dir.join("fresh");
    let bad = nas(&["train", "--data", "cifar10:/nonexistent/dir", "--out", fresh.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("/nonexistent/dir"));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A tiny search through the binary: its folder holds the journal, best.json, the top cells
/// as SVG, the reward plot and the comparison with random cells (a sentence in the output
/// and in report.md, a plot); `nas worker` trains one trial from a file.
#[test]
fn search_and_worker_end_to_end() {
    let dir = std::env::temp_dir().join(format!("nas-cli-search-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let d = dir.to_str().unwrap();
    let tiny = [
        "--children",
        "3",
        "--workers",
        "2",
        "--data",
        "synthetic:48:8",
        "--child-n",
        "1",
        "--child-filters",
        "2",
        "--child-epochs",
        "1",
        "--child-batch",
        "16",
        "--top-k",
        "2",
        "--out",
        d,
        "--progress",
        "plain",
    ];
    let mut args = vec!["search", "--strategy", "random", "--baseline-random", "2"];
    args.extend(tiny);
    let text = stdout_of(&args);
    assert!(text.contains("3 children evaluated"), "{text}");
    assert!(text.contains("the found cell beat ") && text.contains(" of 2 random cells: "), "{text}");
    let run = dir.join("random");
    let report = std::fs::read_to_string(run.join("report.md")).unwrap();
    assert!(report.contains(" of 2 random cells: ") && report.contains("| random 2 |"), "{report}");
    assert!(std::fs::read_to_string(run.join("baseline.svg")).unwrap().contains("found cell"));
    // The top cells with their accuracy and cost, and accuracy against cost as a plot.
    assert!(report.contains("| rank | child | reward | accuracy | mult-adds | parameters |"), "{report}");
    assert!(std::fs::read_to_string(run.join("costs.svg")).unwrap().contains("Pareto front"));
    let top: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run.join("top.json")).unwrap()).unwrap();
    assert_eq!(top["cost_network"], "mobile");
    assert!(top["cells"][0]["cost"]["mult_adds"].as_u64().unwrap() > 0, "{top}");
    // A limit no cell meets: the search ends with an error naming the budget.
    let budget_dir = dir.join("budget");
    let args = ["search", "--strategy", "random", "--max-params", "1", "--children", "1", "--out"];
    let out = nas(&[&args[..], &[budget_dir.to_str().unwrap(), "--progress", "quiet"]].concat());
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("proposals over the budget"), "{err}");
    let best: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("best.json")).unwrap()).unwrap();
    assert!(best["reward"].as_f64().unwrap() >= 0.0);
    let journal = std::fs::read_to_string(run.join("journal.jsonl")).unwrap();
    assert_eq!(journal.lines().filter(|l| l.contains("\"event\":\"result\"")).count(), 3);
    let svgs = std::fs::read_dir(run.join("cells")).unwrap().count();
    assert_eq!(svgs, 2);
    // A second strategy into the same folder: one curve each in the plot.
    let mut args = vec![
        "search",
        "--strategy",
        "evolution",
        "--retrain-top",
        "1",
        "--retrain-epochs",
        "2",
        "--baseline-random",
        "0",
    ];
    args.extend(tiny);
    let text = stdout_of(&args);
    assert!(text.contains("re-trained"), "{text}");
    let plot = std::fs::read_to_string(dir.join("rewards.svg")).unwrap();
    assert!(plot.contains("random") && plot.contains("evolution"), "the plot names both strategies");

    // The same unit of work as a separate process.
    let trial = serde_json::json!({
        "id": 7,
        "spec": best["cell_spec"],
        "recipe": serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(run.join("search.json")).unwrap()).unwrap()["child"],
        "data": { "kind": "synthetic", "seed": 0, "train": 48, "test": 8 },
        "seed": 1,
        "dir": dir.join("worker-child"),
    });
    let trial_path = dir.join("trial.json");
    std::fs::write(&trial_path, trial.to_string()).unwrap();
    let result_path = dir.join("result.json");
    stdout_of(&["worker", "--trial", trial_path.to_str().unwrap(), "--out", result_path.to_str().unwrap()]);
    let result: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&result_path).unwrap()).unwrap();
    assert_eq!(result["id"], 7);
    assert_eq!(result["outcome"]["status"], "trained", "{result}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `nas search` killed with SIGKILL while children train, then resumed: every child finished
/// before the kill is still in the journal, none is trained again, and the budget completes.
#[test]
fn a_killed_search_resumes_without_losing_or_retraining_children() {
    let dir = std::env::temp_dir().join(format!("nas-cli-kill-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let d = dir.to_str().unwrap();
    let args = [
        "search",
        "--strategy",
        "ppo",
        "--children",
        "8",
        "--workers",
        "2",
        "--data",
        "synthetic:160:8",
        "--child-n",
        "1",
        "--child-filters",
        "2",
        "--child-epochs",
        "2",
        "--child-batch",
        "16",
        "--baseline-random",
        "0",
        "--controller-batch",
        "4",
        "--baseline-per",
        "child",
        "--out",
        d,
        "--progress",
        "plain",
    ];
    let mut search = Command::new(env!("CARGO_BIN_EXE_nas"))
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let journal = dir.join("ppo").join("journal.jsonl");
    let results = |text: &str| -> Vec<u64> {
        text.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["event"] == "result" || v["event"] == "failed")
            .map(|v| v["id"].as_u64().unwrap())
            .collect()
    };
    let started = std::time::Instant::now();
    loop {
        let text = std::fs::read_to_string(&journal).unwrap_or_default();
        if results(&text).len() >= 2 {
            break;
        }
        assert!(started.elapsed().as_secs() < 300, "no child finished in 300 s");
        assert!(search.try_wait().unwrap().is_none(), "the search ended before it was killed");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    search.kill().unwrap();
    search.wait().unwrap();
    // The journal's first line records the controller's settings.
    let text = std::fs::read_to_string(&journal).unwrap();
    let start: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    let settings = &start["settings"];
    assert_eq!(
        (settings["batch_size"].as_u64(), settings["baseline_per"].as_str()),
        (Some(4), Some("child")),
        "{start}"
    );
    let before = std::fs::read_to_string(&journal).unwrap();
    let finished = results(&before);
    assert!(finished.len() < 8, "killed too late to test anything");

    let mut resume = args.to_vec();
    resume.push("--resume");
    let text = stdout_of(&resume);
    assert!(text.contains("8 children evaluated"), "{text}");
    let after = std::fs::read_to_string(&journal).unwrap();
    assert!(after.starts_with(before.trim_end_matches(|c| c != '\n')), "the journal is only appended to");
    let all = results(&after);
    let mut unique = all.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!((all.len(), unique.len()), (8, 8), "one result per child: {all:?}");
    for line in after[before.len()..].lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        if v["event"] == "started" {
            assert!(!finished.contains(&v["id"].as_u64().unwrap()), "finished child started again: {line}");
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The transfer path end to end at a tiny size: the built-in data written as JPEGs and read back
/// through the ImageNet folder reader, the cost table beside the paper's figures, the run
/// directory with report, curves and cell; fine-tuning onto 3 classes replaces the classifier;
/// `nas predict` names the classes of a JPEG.
#[test]
fn transfer_fine_tune_and_predict() {
    let work = std::env::temp_dir().join(format!("nas-cli-transfer-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let nas_in = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_nas")).args(args).current_dir(&work).output().unwrap();
        let (stdout, stderr) =
            (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned());
        assert!(out.status.success(), "nas {args:?} failed: {stderr}");
        (stdout, stderr)
    };
    let (stdout, stderr) = nas_in(&[
        "transfer",
        "--cell",
        "nasnet-a",
        "--synthetic-per-class",
        "4",
        "--epochs",
        "1",
        "--batch",
        "8",
        "--out",
        "t1",
        "--progress",
        "plain",
    ]);
    assert!(stderr.contains("NASNet-A Mobile 4 @ 1056, 224 (paper) | 5.3M | 564M | 74.0 %"), "{stderr}");
    assert!(stderr.contains("N = 2, F = 16, 64 px, 10 classes | 0.37M"), "{stderr}");
    assert!(stdout.contains("test top-1"), "{stdout}");
    let run = work.join("t1");
    for file in
        ["report.md", "report.json", "curves.svg", "cell.svg", "metrics.jsonl", "classes.json", "checkpoint.json"]
    {
        assert!(run.join(file).is_file(), "{file} missing");
    }
    let data = std::fs::read_dir(work.join("runs/transfer-data")).unwrap().next().unwrap().unwrap().path();
    let jpegs: Vec<_> = std::fs::read_dir(data.join("train/03_cross")).unwrap().flatten().map(|e| e.path()).collect();
    assert_eq!(jpegs.len(), 4);
    assert_eq!(jpegs[0].extension().unwrap(), "JPEG");

    // Fine-tune onto three of the classes: the classifier is replaced, the rest loaded.
    let three = work.join("three");
    for part in ["train", "val"] {
        for class in ["00_disc", "01_square", "03_cross"] {
            let to = three.join(part).join(class);
            std::fs::create_dir_all(&to).unwrap();
            for f in std::fs::read_dir(data.join(part).join(class)).unwrap().flatten() {
                std::fs::copy(f.path(), to.join(f.file_name())).unwrap();
            }
        }
    }
    let (_, stderr) = nas_in(&[
        "transfer",
        "--cell",
        "nasnet-a",
        "--data",
        three.to_str().unwrap(),
        "--net",
        "2@384",
        "--image",
        "64",
        "--no-aux",
        "--init",
        "t1",
        "--epochs",
        "1",
        "--batch",
        "4",
        "--out",
        "t2",
        "--progress",
        "plain",
    ]);
    assert!(stderr.contains("initialised from t1") && stderr.contains("last_linear.weight"), "{stderr}");
    let classes = nas_train::run::read_class_names(&work.join("t2")).unwrap();
    assert_eq!(classes, ["00_disc", "01_square", "03_cross"]);

    let (stdout, _) = nas_in(&["predict", "--checkpoint", "t2", "--image", jpegs[0].to_str().unwrap(), "--top", "3"]);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{stdout}");
    let total: f64 =
        lines[1..].iter().map(|l| l.trim().split('%').next().unwrap().trim().parse::<f64>().unwrap()).sum();
    assert!((total - 100.0).abs() < 0.01, "three of three classes: {stdout}");
    assert!(["00_disc", "01_square", "03_cross"].iter().all(|c| stdout.contains(c)), "{stdout}");
    std::fs::remove_dir_all(&work).unwrap();
}

/// Without the `cuda` feature, asking for a GPU is refused up front with the way out.
#[cfg(not(feature = "cuda"))]
#[test]
fn a_gpu_device_without_the_cuda_feature_is_a_clear_error() {
    let dir = std::env::temp_dir().join(format!("nas-cli-device-{}", std::process::id()));
    let d = dir.to_str().unwrap();
    let cases: [&[&str]; 4] = [
        &["train", "--cell", "nasnet-a", "--data", "synthetic:64", "--device", "cuda", "--out", d],
        &["search", "--children", "1", "--device", "cuda:0", "--out", d],
        &["bench", "--device", "cuda"],
        &["eval", "--checkpoint", d, "--device", "cuda:1"],
    ];
    for args in cases {
        let out = nas(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(err.contains("--features cuda"), "{args:?}: {err}");
    }
    let out = nas(&["bench", "--device", "tpu"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected cpu, cuda or cuda:N"));
    assert!(!dir.join("run.json").exists(), "nothing was started");
}
