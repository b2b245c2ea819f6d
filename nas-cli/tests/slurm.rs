//! `nas search --executor slurm` against a real Slurm cluster: `.ci/slurm up DIR` starts a
//! single-node one and prints the `SLURM_CONF` to export. These tests are ignored by a plain
//! `cargo test` (they need the daemons); CI runs them with `--ignored` after starting the
//! cluster (see `.ci/run`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A fresh folder for one test.
fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("nas-slurm-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A worker program for the cluster: `nas` itself, except that child 1 always fails (exit
/// 3 without a result) when `NAS_TEST_FAIL_CHILD_1` is set, child ID sleeps S seconds first
/// when `NAS_TEST_HOLD` is `ID:S`, and every child sleeps `NAS_TEST_SLOW` seconds first.
fn worker_wrapper(dir: &Path) -> PathBuf {
    let path = dir.join("worker.sh");
    let script = format!(
        "#!/bin/bash\n\
         trial=\"$3\"\n\
         if [ -n \"${{NAS_TEST_FAIL_CHILD_1:-}}\" ] && grep -q '^  \"id\": 1,' \"$trial\"; then\n\
         \x20 echo 'failing on purpose' >&2; exit 3\n\
         fi\n\
         if [ -n \"${{NAS_TEST_HOLD:-}}\" ] && grep -q \"^  \\\"id\\\": ${{NAS_TEST_HOLD%%:*}},\" \"$trial\"; then\n\
         \x20 sleep \"${{NAS_TEST_HOLD#*:}}\"\n\
         fi\n\
         sleep \"${{NAS_TEST_SLOW:-0}}\"\n\
         exec '{}' \"$@\"\n",
        env!("CARGO_BIN_EXE_nas")
    );
    std::fs::write(&path, script).unwrap();
    Command::new("chmod").arg("+x").arg(&path).status().unwrap();
    path
}

fn search_args(out: &Path, wrapper: &Path, children: usize) -> Vec<String> {
    [
        "search",
        "--strategy",
        "random",
        "--executor",
        "slurm",
        "--worker-program",
        wrapper.to_str().unwrap(),
        "--poll-seconds",
        "0.5",
        "--retries",
        "1",
        "--children",
        &children.to_string(),
        "--workers",
        "3",
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
        "--out",
        out.to_str().unwrap(),
        "--progress",
        "plain",
    ]
    .map(String::from)
    .to_vec()
}

fn spawn(args: &[String], env: &[(&str, &str)]) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nas"));
    cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().expect("runs nas")
}

fn finish(child: Child) -> (Output, String, String) {
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) =
        (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned());
    (out, stdout, stderr)
}

fn journal(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("journal.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn state(dir: &Path) -> Value {
    std::fs::read_to_string(dir.join("slurm.json")).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default()
}

/// Every task recorded in slurm.json: (job id, child id, attempt, state).
fn tasks(dir: &Path) -> Vec<(String, u64, u64, String)> {
    let s = state(dir);
    let mut out = Vec::new();
    for sub in s["submissions"].as_array().into_iter().flatten() {
        for t in sub["tasks"].as_array().into_iter().flatten() {
            out.push((
                sub["job_id"].as_str().unwrap().to_string(),
                t["trial_id"].as_u64().unwrap(),
                t["attempt"].as_u64().unwrap(),
                t["state"].as_str().unwrap().to_string(),
            ));
        }
    }
    out
}

/// `squeue` lines (`JOB_INDEX|STATE`) of the search's job name.
fn queued(dir: &Path) -> Vec<String> {
    let name = state(dir)["job_name"].as_str().unwrap_or("none").to_string();
    let out = Command::new("squeue")
        .args(["--noheader", "--array", &format!("--name={name}"), "--format=%i|%T"])
        .output()
        .expect("squeue runs");
    assert!(out.status.success(), "squeue: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().map(|l| l.trim().to_string()).filter(|l| !l.is_empty()).collect()
}

fn wait_until(what: &str, limit: Duration, mut ready: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ready() {
        assert!(start.elapsed() < limit, "timed out after {limit:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn ids_of(events: &[Value], kind: &str) -> Vec<u64> {
    events.iter().filter(|e| e["event"] == kind).map(|e| e["id"].as_u64().unwrap()).collect()
}

/// A search on Slurm with one child that fails on purpose (retried once, then recorded with
/// Slurm's state and exit code) and one cancelled from outside with `scancel` (recorded as
/// such, not retried); every other child is trained once.
#[test]
#[ignore = "needs a Slurm cluster: `.ci/slurm up DIR`, export SLURM_CONF, then --ignored"]
fn a_search_on_slurm_records_a_failing_and_a_cancelled_child() {
    let root = temp("fail");
    let wrapper = worker_wrapper(&root);
    let out = root.join("search");
    let dir = out.join("random");
    let child = spawn(&search_args(&out, &wrapper, 6), &[("NAS_TEST_FAIL_CHILD_1", "1"), ("NAS_TEST_HOLD", "2:60")]);
    // Cancel child 2's task from outside once Slurm runs it.
    let mut target = String::new();
    wait_until("child 2 running", Duration::from_secs(120), || {
        let Some((job, ..)) = tasks(&dir).into_iter().find(|t| t.1 == 2) else { return false };
        let index = state(&dir)["submissions"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["job_id"] == job.as_str())
            .flat_map(|s| s["tasks"].as_array().unwrap().clone())
            .find(|t| t["trial_id"] == 2)
            .map(|t| t["index"].as_u64().unwrap())
            .unwrap();
        target = format!("{job}_{index}");
        queued(&dir).iter().any(|l| *l == format!("{target}|RUNNING"))
    });
    let cancel = Command::new("scancel").arg(&target).output().unwrap();
    assert!(cancel.status.success(), "scancel {target}: {}", String::from_utf8_lossy(&cancel.stderr));
    let (status, stdout, stderr) = finish(child);
    assert!(status.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("6 children evaluated (4 trained, 0 cached, 2 failed)"), "{stdout}\n{stderr}");

    let events = journal(&dir);
    let failed: Vec<&Value> = events.iter().filter(|e| e["event"] == "failed").collect();
    let reason = |id: u64| failed.iter().find(|e| e["id"] == id).map(|e| e["reason"].as_str().unwrap().to_string());
    let one = reason(1).expect("child 1 failed");
    assert!(one.contains("FAILED") && one.contains("exit code 3:0"), "{one}");
    assert!(one.contains("attempt 2 of 2") && one.contains("failing on purpose"), "{one}");
    let two = reason(2).expect("child 2 failed");
    assert!(two.contains("cancelled outside the search") && two.contains("CANCELLED"), "{two}");
    // Child 1 was submitted twice, child 2 once, the others once each.
    let all = tasks(&dir);
    let attempts = |id: u64| all.iter().filter(|t| t.1 == id).count();
    assert_eq!((attempts(1), attempts(2)), (2, 1), "{all:?}");
    for id in [0, 3, 4, 5] {
        assert_eq!(attempts(id), 1, "child {id}: {all:?}");
    }
    let mut results = ids_of(&events, "result");
    results.sort_unstable();
    assert_eq!(results, [0, 3, 4, 5]);
    assert!(all.iter().all(|t| t.3 != "live"), "{all:?}");
    std::fs::remove_dir_all(&root).unwrap();
}

/// Ctrl-C cancels the search's jobs; a later `--resume` submits them again. A search killed
/// outright leaves its jobs running; `--resume` waits for those instead of submitting them
/// again, and every child ends with one result.
#[test]
#[ignore = "needs a Slurm cluster: `.ci/slurm up DIR`, export SLURM_CONF, then --ignored"]
fn a_stopped_or_killed_search_on_slurm_cancels_or_reattaches() {
    let root = temp("resume");
    let wrapper = worker_wrapper(&root);
    let out = root.join("search");
    let dir = out.join("random");
    let args = search_args(&out, &wrapper, 5);
    let running = |dir: &Path| queued(dir).iter().filter(|l| l.ends_with("|RUNNING")).count();

    // Ctrl-C: the running tasks are cancelled and nothing of this search stays queued.
    let child = spawn(&args, &[("NAS_TEST_SLOW", "60")]);
    wait_until("two tasks running", Duration::from_secs(120), || running(&dir) >= 2);
    Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    let (status, stdout, stderr) = finish(child);
    assert!(status.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("search stopped"), "{stdout}\n{stderr}");
    assert!(stderr.contains("cancelled Slurm jobs"), "{stderr}");
    wait_until("the queue to empty", Duration::from_secs(30), || queued(&dir).is_empty());
    let cancelled: Vec<u64> = tasks(&dir).iter().filter(|t| t.3 == "cancelled").map(|t| t.1).collect();
    assert!(!cancelled.is_empty(), "{:?}", tasks(&dir));
    assert!(ids_of(&journal(&dir), "result").is_empty());

    // Resume slowly, then kill -9 the search while its tasks run: they go on.
    let mut resume = args.clone();
    resume.push("--resume".into());
    let mut child = spawn(&resume, &[("NAS_TEST_SLOW", "8")]);
    let submitted_before = tasks(&dir).len();
    wait_until("two resumed tasks running", Duration::from_secs(120), || {
        tasks(&dir).len() > submitted_before && running(&dir) >= 2
    });
    child.kill().unwrap();
    child.wait().unwrap();
    let live: Vec<(String, u64, u64, String)> = tasks(&dir).into_iter().filter(|t| t.3 == "live").collect();
    assert!(!live.is_empty());
    assert!(!queued(&dir).is_empty(), "the killed search's jobs still run");
    let before = tasks(&dir).len();
    // As if the kill had come between sbatch and the search recording its answer: the
    // resumed search must find those jobs by their batch scripts.
    let mut saved = state(&dir);
    for sub in saved["submissions"].as_array_mut().unwrap() {
        if sub["tasks"].as_array().unwrap().iter().any(|t| t["state"] == "live") {
            sub["job_id"] = "".into();
        }
    }
    std::fs::write(dir.join("slurm.json"), serde_json::to_string_pretty(&saved).unwrap()).unwrap();

    // The second resume waits for the live tasks instead of submitting them again.
    let (status, stdout, stderr) = finish(spawn(&resume, &[]));
    assert!(status.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("5 children evaluated (5 trained"), "{stdout}\n{stderr}");
    let after = tasks(&dir);
    for (job, id, ..) in &live {
        // Waited for under the job id found again in the queue.
        assert!(stderr.contains(&format!("child {id}: waiting for its Slurm task {job}_")), "{stderr}");
        let submissions = after[before..].iter().filter(|t| t.1 == *id).count();
        assert_eq!(submissions, 0, "child {id} was submitted again: {after:?}");
    }
    let mut results = ids_of(&journal(&dir), "result");
    results.sort_unstable();
    assert_eq!(results, [0, 1, 2, 3, 4], "one result per child");
    std::fs::remove_dir_all(&root).unwrap();
}

/// A child over its `--time` limit is killed by Slurm and journaled with the TIMEOUT state
/// and reason (no retries asked); the other child is trained.
#[test]
#[ignore = "needs a Slurm cluster: `.ci/slurm up DIR`, export SLURM_CONF, then --ignored"]
fn a_child_over_its_time_limit_is_journaled_as_timed_out() {
    let root = temp("timeout");
    let wrapper = worker_wrapper(&root);
    let out = root.join("search");
    let dir = out.join("random");
    let mut args = search_args(&out, &wrapper, 2);
    // Slurm's smallest limit is one minute; it enforces it within about 30 s more.
    let retries = args.iter().position(|a| a == "--retries").unwrap();
    args[retries + 1] = "0".into();
    args.extend(["--time", "1"].map(String::from));
    let (status, stdout, stderr) = finish(spawn(&args, &[("NAS_TEST_HOLD", "0:600")]));
    assert!(status.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("2 children evaluated (1 trained, 0 cached, 1 failed)"), "{stdout}\n{stderr}");
    let events = journal(&dir);
    let failed = events.iter().find(|e| e["event"] == "failed").expect("a failure");
    assert_eq!(failed["id"], 0);
    let reason = failed["reason"].as_str().unwrap();
    assert!(
        reason.contains("TIMEOUT") && reason.contains("TimeLimit") && reason.contains("attempt 1 of 1"),
        "{reason}"
    );
    assert_eq!(ids_of(&events, "result"), [1]);
    std::fs::remove_dir_all(&root).unwrap();
}
