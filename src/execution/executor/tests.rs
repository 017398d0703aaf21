//! The pipeline without bubblewrap or cgroups: the `process` backend runs plain `sh`
//! commands in slots with no memory cgroup, tmpfs or launcher, so compile-then-run, how
//! stages end, and slot hand-out are tested as units. (The sandboxed path has its own
//! suites under `tests/`.)

use std::sync::Arc;
use std::time::Duration;

use super::{Executor, ExecutorOptions};
use crate::config::{BackendKind, SandboxSettings};
use crate::execution::{ExecutionRequest, LimitKind, Limits, NoopObserver, StageStatus};
use crate::runtimes::Runtime;

fn executor(slots: usize, queue: usize) -> (Arc<Executor>, tempfile::TempDir) {
    let work = tempfile::tempdir().expect("a temp dir");
    let options = ExecutorOptions {
        slots,
        queue_size: queue,
        max_queue_wait: Duration::from_secs(30),
        work_root: work.path().to_path_buf(),
        workdir_bytes: Limits::default_run().workdir_bytes,
        max_limits: Limits::default_max(),
        sandbox: SandboxSettings {
            backend: BackendKind::Process,
            memory_cgroup: false,
            tmpfs_workdir: false,
            launcher: false,
            prepare_sandboxes: false,
            // A range no other test uses, should this run as root.
            uid_base: 64_800,
            ..SandboxSettings::default()
        },
        compile_cache_bytes: Some(1 << 20),
    };
    let executor = Executor::new(options, Arc::new(NoopObserver)).expect("an executor");
    (Arc::new(executor), work)
}

fn sh(script: &str, compile: Option<&str>) -> Arc<Runtime> {
    let compile = compile.map(|c| vec!["sh", "-c", c]);
    Arc::new(Runtime::ad_hoc(
        "sh",
        "main.sh",
        &["sh", "-c", script],
        compile.as_deref(),
        BackendKind::Process,
    ))
}

async fn run(executor: &Arc<Executor>, runtime: Arc<Runtime>) -> crate::execution::ExecutionReport {
    let request = ExecutionRequest::single_file(runtime, b"echo from the file".to_vec());
    executor
        .execute(request, std::future::pending())
        .await
        .expect("admitted")
}

#[tokio::test]
async fn the_run_stage_sees_what_the_compile_stage_built() {
    let (executor, _work) = executor(1, 0);
    let report = run(&executor, sh("cat built", Some("echo artifact > built"))).await;
    let compile = report.compile.expect("a compile stage");
    assert_eq!(compile.status, StageStatus::Ok);
    let run = report.run.expect("a run stage");
    assert_eq!(run.status, StageStatus::Ok);
    assert_eq!(run.stdout, b"artifact\n");
}

#[tokio::test]
async fn a_failed_compile_is_a_compile_error_and_nothing_runs() {
    let (executor, _work) = executor(1, 0);
    let report = run(&executor, sh("echo ran", Some("echo nope >&2; exit 3"))).await;
    let compile = report.compile.expect("a compile stage");
    assert_eq!(compile.status, StageStatus::CompileError);
    assert_eq!(compile.exit_code, Some(3));
    assert_eq!(compile.stderr, b"nope\n");
    assert!(report.run.is_none());
}

#[tokio::test]
async fn exits_signals_and_the_wall_clock_are_told_apart() {
    let (executor, _work) = executor(1, 0);
    let report = run(&executor, sh("exit 137", None)).await;
    let stage = report.run.expect("a run stage");
    assert_eq!((stage.exit_code, stage.signal), (Some(137), None));
    assert_eq!(stage.status, StageStatus::RuntimeError);

    let report = run(&executor, sh("kill -SEGV $$", None)).await;
    let stage = report.run.expect("a run stage");
    assert_eq!((stage.exit_code, stage.signal), (None, Some(libc::SIGSEGV)));

    let mut slow = Runtime::clone(&sh("sleep 5", None));
    slow.limits.wall_time_ms = 200;
    let slow = Arc::new(slow);
    let mut request = ExecutionRequest::single_file(Arc::clone(&slow), Vec::new());
    request.limits = slow.limits;
    let report = executor
        .execute(request, std::future::pending())
        .await
        .expect("admitted");
    let stage = report.run.expect("a run stage");
    assert_eq!(stage.limit, Some(LimitKind::WallTime));
    assert_eq!(stage.status, StageStatus::Timeout);
}

#[tokio::test]
async fn each_run_gets_its_own_slot_and_a_full_queue_refuses() {
    let (executor, _work) = executor(2, 0);
    // Two runs at once each see an empty work dir: neither finds the other's file.
    let race = "test -e mine && echo taken; : > mine; sleep 0.3; echo done";
    let (a, b) = tokio::join!(
        run(&executor, sh(race, None)),
        run(&executor, sh(race, None))
    );
    for report in [a, b] {
        assert_eq!(report.run.expect("a run stage").stdout, b"done\n");
    }
    // Both slots busy and no queue: a third is refused at once.
    let long = sh("sleep 1", None);
    let first = tokio::spawn({
        let (e, r) = (Arc::clone(&executor), Arc::clone(&long));
        async move { run(&e, r).await }
    });
    let second = tokio::spawn({
        let (e, r) = (Arc::clone(&executor), Arc::clone(&long));
        async move { run(&e, r).await }
    });
    while executor.running() < 2 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let refused = executor
        .execute(
            ExecutionRequest::single_file(long, Vec::new()),
            std::future::pending(),
        )
        .await;
    assert!(matches!(
        refused,
        Err(crate::execution::ExecuteError::Busy(_))
    ));
    for handle in [first, second] {
        assert!(handle.await.expect("joins").run.is_some());
    }
}

#[tokio::test]
async fn a_queued_submission_whose_client_left_never_runs() {
    let (executor, work) = executor(1, 4);
    let busy = tokio::spawn({
        let e = Arc::clone(&executor);
        async move { run(&e, sh("sleep 0.5", None)).await }
    });
    while executor.running() < 1 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let marker = work.path().join("ran");
    let script = format!("touch {}", marker.display());
    let gone = tokio::time::sleep(Duration::from_millis(50));
    let abandoned = executor
        .execute(
            ExecutionRequest::single_file(sh(&script, None), Vec::new()),
            gone,
        )
        .await;
    assert!(matches!(
        abandoned,
        Err(crate::execution::ExecuteError::Abandoned)
    ));
    assert_eq!(executor.waiting(), 0);
    busy.await.expect("joins");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!marker.exists(), "the abandoned program ran");
}

#[tokio::test]
async fn a_second_identical_compile_comes_from_the_cache() {
    let (executor, _work) = executor(1, 0);
    // Every compile writes something new, so the run shows which compile it runs from.
    let runtime = sh("cat built", Some("date +%s%N > built"));
    let first = run(&executor, Arc::clone(&runtime)).await;
    let second = run(&executor, Arc::clone(&runtime)).await;
    assert!(!first.compile_cached && second.compile_cached);
    let built = first.run.expect("a run stage").stdout;
    assert_eq!(second.run.expect("a run stage").stdout, built);
    let mut other = ExecutionRequest::single_file(runtime, b"another file".to_vec());
    other.limits = Limits::default_run();
    let third = executor
        .execute(other, std::future::pending())
        .await
        .expect("admitted");
    assert!(!third.compile_cached, "other bytes are another key");
    assert_ne!(third.run.expect("a run stage").stdout, built);
}

#[tokio::test]
async fn a_batch_compiles_once_and_runs_every_test_in_a_fresh_work_dir() {
    use crate::execution::{BatchRequest, BatchTest};
    let (executor, _work) = executor(2, 0);
    let runtime = sh(
        "head -n1 built; test -e mark && echo seen; : > mark; cat",
        Some("date +%s%N > built"),
    );
    let tests = (0..6)
        .map(|i| BatchTest {
            stdin: format!("t{i}\n").into_bytes(),
            args: Vec::new(),
            expected_output: None,
        })
        .collect();
    let batch = BatchRequest {
        request: ExecutionRequest::single_file(runtime, Vec::new()),
        tests,
        stop_at_first_failure: false,
        wall_time: Duration::from_secs(30),
    };
    let report = executor
        .execute_batch(batch, tokio_util::sync::CancellationToken::new())
        .await
        .expect("admitted");
    assert_eq!(
        report.compile.as_ref().map(|c| c.status),
        Some(StageStatus::Ok)
    );
    let first = report.tests[0].run.as_ref().expect("ran").stdout.clone();
    let built = String::from_utf8_lossy(&first)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string();
    assert!(!built.is_empty());
    for (i, test) in report.tests.iter().enumerate() {
        let out = String::from_utf8_lossy(&test.run.as_ref().expect("ran").stdout).into_owned();
        assert_eq!(
            out,
            format!("{built}\nt{i}\n"),
            "one compile, no earlier test's file"
        );
    }
    assert!(report.stopped.is_none());
}
