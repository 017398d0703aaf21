//! Judge workloads through `POST /api/v1/execute`: test-case batches (compiled once, one
//! fresh sandbox per test, bounded), the compile cache (hits, misses on any changed input,
//! read-only to runs, its byte bound), and programs that run as users expect (Java class
//! names, heaps sized from the memory limit, `multiprocessing`, `compile_limits`, limit
//! messages). Every app gets its own `sandbox.uid_base` from 56000 up.

mod common;

use common::{TestApp, app_with, bounded, installed_or_skip, test_settings};
use mixed_docker_executor::config::Settings;
use serde_json::{Value, json};

fn settings(uid_base: u32) -> Settings {
    let mut s = test_settings();
    s.sandbox.uid_base = uid_base;
    s
}

async fn app(uid_base: u32) -> TestApp {
    app_with(settings(uid_base)).await
}

/// The value of the series `name{labels...}` in a scrape (0 when absent).
async fn metric(app: &TestApp, name: &str, labels: &[&str]) -> f64 {
    let (_, text) = app.get("/metrics").await;
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

const CPP_DOUBLE: &str =
    "#include <iostream>\nint main(){long n; std::cin>>n; std::cout<<n*2<<\"\\n\";}";

#[tokio::test(flavor = "multi_thread")]
async fn a_cpp_batch_compiles_once_and_judges_every_test() {
    if !installed_or_skip("g++", "C++ batch") {
        return;
    }
    bounded(180, async {
        let app = app(56000).await;
        let compiles = r#"runtime="cpp""#;
        let before = metric(&app, "mde_compiles_total", &[compiles]).await;
        // 20 tests: every fifth expects a wrong answer.
        let tests: Vec<Value> = (0..20)
            .map(|i| {
                let want = if i % 5 == 4 { i * 2 + 1 } else { i * 2 };
                json!({"name": format!("t{i}"), "stdin": format!("{i}\n"), "expected_output": format!("{want}\n")})
            })
            .collect();
        let json = app
            .execute(json!({"runtime": "cpp", "code": CPP_DOUBLE, "tests": tests}))
            .await;
        let after = metric(&app, "mde_compiles_total", &[compiles]).await;
        assert_eq!(after - before, 1.0, "compiled exactly once: {json}");
        assert_eq!(json["compile"]["status"], "ok", "{json}");
        assert_eq!(json["compile"]["cached"], false);
        assert!(json.get("run").is_none(), "a batch has tests, not run: {json}");
        let results = json["tests"].as_array().expect("tests");
        assert_eq!(results.len(), 20);
        for (i, t) in results.iter().enumerate() {
            assert_eq!(t["name"], format!("t{i}"));
            assert_eq!(t["run"]["stdout"], format!("{}\n", i * 2), "{t}");
            let (outcome, verdict) = if i % 5 == 4 {
                ("failed", "wrong_answer")
            } else {
                ("passed", "accepted")
            };
            assert_eq!(t["outcome"], outcome, "test {i}: {t}");
            assert_eq!(t["verdict"], verdict, "test {i}: {t}");
        }
        let summary = &json["summary"];
        assert_eq!(summary["total"], 20);
        assert_eq!(summary["passed"], 16);
        assert_eq!(summary["failed"], 4);
        assert_eq!(summary["skipped"], 0);
        assert_eq!(summary["first_failure"], 4);
        assert!(summary.get("stopped").is_none(), "{summary}");
        // Each test counted as an execution.
        let runs = metric(&app, "mde_executions_total", &[r#"runtime="cpp""#]).await;
        assert!(runs >= 20.0, "{runs}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn stop_at_first_failure_starts_no_later_test() {
    if !installed_or_skip("gcc", "stop at first failure") {
        return;
    }
    bounded(120, async {
        let app = app(56100).await;
        // Every test but the failing one takes 200 ms, so test 2 fails while test 3 is
        // still running, whatever the scheduling: then no later test may start.
        let code = "#include <stdio.h>\n#include <unistd.h>\nint main(void){int n; if(scanf(\"%d\",&n)!=1) return 3; if(n != 2) usleep(200000); printf(\"%d\\n\", n); return n == 2 ? 1 : 0;}";
        let tests: Vec<Value> = (0..12)
            .map(|i| json!({"stdin": format!("{i}"), "expected_output": format!("{i}")}))
            .collect();
        let json = app
            .execute(json!({"runtime": "c", "code": code, "tests": tests, "stop_at_first_failure": true}))
            .await;
        let summary = &json["summary"];
        assert_eq!(summary["first_failure"], 2, "{json}");
        assert_eq!(summary["stopped"], "first_failure", "{json}");
        assert_eq!(json["status"], "runtime_error", "the first failure's status: {json}");
        let results = json["tests"].as_array().expect("tests");
        assert_eq!(results[2]["outcome"], "failed");
        assert_eq!(results[2]["run"]["exit_code"], 1);
        // With two slots only test 3 was running when test 2 failed.
        let skipped = summary["skipped"].as_u64().unwrap_or(0);
        assert!(skipped >= 8, "later tests must not start: {summary}");
        for t in &results[5..] {
            assert_eq!(t["outcome"], "skipped", "{t}");
            assert!(t.get("run").is_none());
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn batch_bounds_are_4xx_that_state_the_maximum() {
    bounded(60, async {
        let mut s = settings(56200);
        s.execution.max_batch_tests = 5;
        s.execution.max_batch_input_bytes = 1000;
        s.execution.max_batch_wall_time_ms = 5000;
        let app = app_with(s).await;
        let tests = |n: usize, stdin: &str| -> Vec<Value> {
            (0..n).map(|_| json!({"stdin": stdin})).collect()
        };
        let cases = [
            (
                json!({"code": "print(1)", "tests": tests(6, "")}),
                "limit_exceeded",
                "maximum of 5",
            ),
            (
                json!({"code": "print(1)", "tests": tests(2, &"x".repeat(600))}),
                "limit_exceeded",
                "maximum of 1000",
            ),
            (
                json!({"code": "print(1)", "tests": tests(1, ""), "batch_wall_time_ms": 5001}),
                "limit_exceeded",
                "10 to 5000",
            ),
            (
                json!({"code": "print(1)", "tests": []}),
                "invalid_request",
                "at least one",
            ),
            (
                json!({"code": "print(1)", "tests": tests(1, ""), "stdin": "x"}),
                "invalid_request",
                "per test",
            ),
            (
                json!({"code": "print(1)", "stop_at_first_failure": true}),
                "invalid_request",
                "need `tests`",
            ),
            (
                json!({"code": "print(1)", "tests": [{"stdin": 1}]}),
                "bad_request",
                "`stdin`",
            ),
            (
                json!({"code": "print(1)", "tests": [{"input": "x"}]}),
                "bad_request",
                "unknown field",
            ),
        ];
        for (body, code, mentions) in cases {
            let (status, json) = app.post("/api/v1/execute", &body).await;
            assert!((400..500).contains(&status), "{body}: {status} {json}");
            assert_eq!(json["code"], code, "{body}: {json}");
            let message = json["message"].as_str().unwrap_or_default();
            assert!(message.contains(mentions), "{body}: {message}");
        }
        // Within the bounds the same batch runs.
        let json = app
            .execute(
                json!({"code": "import sys; print(sys.stdin.read())", "tests": tests(5, "hi")}),
            )
            .await;
        assert_eq!(json["summary"]["passed"], 5, "{json}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hostile_test_leaves_the_others_alone_and_tests_share_no_files() {
    if !installed_or_skip("gcc", "hostile tests in a batch") {
        return;
    }
    bounded(180, async {
        let app = app(56300).await;
        // By its stdin: a fork bomb, a memory bomb, an endless loop, or an honest test that
        // also checks that no earlier test's files are here, and leaves some of its own.
        let code = r#"#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <fcntl.h>
int main(void) {
  char what[32] = {0};
  if (scanf("%31s", what) != 1) return 2;
  if (!strcmp(what, "fork")) { for (;;) fork(); }
  if (!strcmp(what, "mem")) { for (;;) { char *p = malloc(1 << 20); if (p) memset(p, 1, 1 << 20); } }
  if (!strcmp(what, "loop")) { for (;;) {} }
  int seen = access("/tmp/mark", F_OK) == 0 || access("/box/mark", F_OK) == 0 || access("/dev/shm/mark", F_OK) == 0;
  close(open("/tmp/mark", O_CREAT | O_WRONLY, 0644));
  close(open("/box/mark", O_CREAT | O_WRONLY, 0644));
  close(open("/dev/shm/mark", O_CREAT | O_WRONLY, 0644));
  int binary_writable = open("./main", O_WRONLY) >= 0 || unlink("./main") == 0;
  printf("%s %s %s\n", what, seen ? "seen" : "fresh", binary_writable ? "writable" : "sealed");
  return 0;
}"#;
        let inputs = ["a", "fork", "b", "mem", "c", "loop", "d", "e"];
        let tests: Vec<Value> = inputs
            .iter()
            .map(|i| json!({"stdin": i, "expected_output": format!("{i} fresh sealed")}))
            .collect();
        let json = app
            .execute(json!({
                "runtime": "c", "code": code, "tests": tests,
                "limits": {"wall_time_ms": 3000, "cpu_time_ms": 2000, "memory_bytes": 67108864, "processes": 32}
            }))
            .await;
        let results = json["tests"].as_array().expect("tests");
        for (i, input) in inputs.iter().enumerate() {
            let t = &results[i];
            match *input {
                "fork" | "mem" | "loop" => {
                    assert_eq!(t["outcome"], "failed", "{input}: {t}");
                    assert_ne!(t["run"]["status"], "ok", "{input}: {t}");
                }
                _ => {
                    assert_eq!(t["outcome"], "passed", "{input}: {t}");
                    assert_eq!(t["run"]["stdout"], format!("{input} fresh sealed\n"));
                }
            }
        }
        assert_eq!(results[3]["run"]["status"], "memory_limit", "{}", results[3]);
        assert_eq!(results[5]["run"]["status"], "timeout", "{}", results[5]);
        for t in [&results[3], &results[5]] {
            let message = t["run"]["message"].as_str().unwrap_or_default();
            assert!(message.contains("limit of"), "a limit kill says which: {t}");
        }
        assert_eq!(json["summary"]["passed"], 5, "{}", json["summary"]);
    })
    .await;
}

struct Compiled {
    runtime: &'static str,
    tool: &'static str,
    hello: &'static str,
}

const COMPILED: &[Compiled] = &[
    Compiled {
        runtime: "c",
        tool: "gcc",
        hello: "#include <stdio.h>\nint main(void){puts(\"hello\");return 0;}",
    },
    Compiled {
        runtime: "cpp",
        tool: "g++",
        hello: "#include <iostream>\nint main(){std::cout<<\"hello\\n\";}",
    },
    Compiled {
        runtime: "java",
        tool: "javac",
        hello: "class Main { public static void main(String[] a) { System.out.println(\"hello\"); } }",
    },
    Compiled {
        runtime: "rust",
        tool: "rustc",
        hello: "fn main() { println!(\"hello\"); }",
    },
    Compiled {
        runtime: "go",
        tool: "go",
        hello: "package main\nimport \"fmt\"\nfunc main() { fmt.Println(\"hello\") }",
    },
];

#[tokio::test(flavor = "multi_thread")]
async fn a_second_identical_submission_hits_the_cache_and_any_change_misses() {
    bounded(400, async {
        let app = app(56400).await;
        for lang in COMPILED {
            if !installed_or_skip(lang.tool, lang.runtime) {
                continue;
            }
            let label = format!(r#"runtime="{}""#, lang.runtime);
            let labels = [label.as_str()];
            let compiles = || metric(&app, "mde_compiles_total", &labels);
            let before = compiles().await;
            let body = json!({"runtime": lang.runtime, "code": lang.hello});
            let first = app.execute(body.clone()).await;
            assert_eq!(first["compile"]["cached"], false, "{first}");
            assert_eq!(first["run"]["stdout"], "hello\n", "{first}");
            let second = app.execute(body.clone()).await;
            assert_eq!(
                second["compile"]["cached"], true,
                "{}: {second}",
                lang.runtime
            );
            assert_eq!(second["run"]["stdout"], "hello\n", "{second}");
            assert_eq!(
                compiles().await - before,
                1.0,
                "{}: one compile",
                lang.runtime
            );
            // One byte more (a trailing newline) is another program.
            let changed = app
                .execute(json!({"runtime": lang.runtime, "code": format!("{}\n", lang.hello)}))
                .await;
            assert_eq!(changed["compile"]["cached"], false, "{changed}");
            // So is another compile limit.
            let limited = app
                .execute(json!({"runtime": lang.runtime, "code": lang.hello,
                                "compile_limits": {"wall_time_ms": 59000}}))
                .await;
            assert_eq!(limited["compile"]["cached"], false, "{limited}");
            assert_eq!(compiles().await - before, 3.0, "{}", lang.runtime);
        }
        assert!(metric(&app, "mde_compile_cache_events_total", &[r#"event="hit""#]).await >= 1.0);
        assert!(metric(&app, "mde_compile_cache_bytes", &[]).await > 0.0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_compile_is_cached_and_a_changed_flag_in_runtimes_toml_misses() {
    if !installed_or_skip("g++", "compile cache and runtimes.toml") {
        return;
    }
    bounded(180, async {
        let dir = tempfile::tempdir().expect("a temp dir");
        let file = dir.path().join("runtimes.toml");
        let original =
            std::fs::read_to_string(common::repo_path("runtimes.toml")).expect("runtimes.toml");
        std::fs::write(&file, &original).expect("write");
        let mut s = settings(56500);
        s.runtimes.file = file.clone();
        let app = app_with(s).await;

        let broken = json!({"runtime": "cpp", "code": "int main() { return missing; }"});
        let first = app.execute(broken.clone()).await;
        assert_eq!(first["status"], "compile_error", "{first}");
        let again = app.execute(broken).await;
        assert_eq!(again["status"], "compile_error");
        assert_eq!(again["compile"]["cached"], true, "{again}");
        assert_eq!(
            again["compile"]["stderr"], first["compile"]["stderr"],
            "same error"
        );

        let body = json!({"runtime": "cpp", "code": CPP_DOUBLE, "stdin": "21"});
        assert_eq!(app.execute(body.clone()).await["compile"]["cached"], false);
        assert_eq!(app.execute(body.clone()).await["compile"]["cached"], true);
        let evicted = r#"event="evicted""#;
        let before = metric(&app, "mde_compile_cache_events_total", &[evicted]).await;
        let changed = original.replacen(
            r#"command = ["g++", "-O2""#,
            r#"command = ["g++", "-O1""#,
            1,
        );
        assert_ne!(changed, original, "the test must change a flag");
        std::fs::write(&file, changed).expect("write");
        app.app.state.reloader.reload().await.expect("reloads");
        let after = metric(&app, "mde_compile_cache_events_total", &[evicted]).await;
        assert!(
            after - before >= 2.0,
            "the reload drops cpp's entries: {before} -> {after}"
        );
        let json = app.execute(body).await;
        assert_eq!(json["compile"]["cached"], false, "{json}");
        assert_eq!(json["run"]["stdout"], "42\n");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_run_cannot_write_into_the_cache_and_the_cache_keeps_its_bound() {
    if !installed_or_skip("gcc", "cache bound") {
        return;
    }
    bounded(300, async {
        let mut s = settings(56600);
        s.compile_cache.max_bytes = 256 * 1024;
        let app = app_with(s).await;
        // The program tries to change what it was built into, then says what it is.
        let code = r#"#include <stdio.h>
#include <unistd.h>
#include <fcntl.h>
#include <sys/stat.h>
int main(void) {
  int changed = 0;
  int fd = open("./main", O_WRONLY | O_TRUNC);
  if (fd >= 0) { write(fd, "x", 1); changed = 1; }
  if (unlink("./main") == 0) changed = 1;
  if (chmod("./main", 0777) == 0) changed = 1;
  if (rename("./main", "./moved") == 0) changed = 1;
  FILE *f = fopen("./main.c", "w");
  if (f) { fputs("int main(){return 7;}", f); fclose(f); changed = 1; }
  printf("original %s\n", changed ? "changed" : "intact");
  return 0;
}"#;
        let body = json!({"runtime": "c", "code": code});
        let first = app.execute(body.clone()).await;
        assert_eq!(first["run"]["stdout"], "original intact\n", "{first}");
        let second = app.execute(body).await;
        assert_eq!(second["compile"]["cached"], true, "{second}");
        assert_eq!(second["run"]["stdout"], "original intact\n", "{second}");

        // A flood of distinct programs: the cache stays under its bound and evicts.
        let bound = 256.0 * 1024.0;
        for i in 0..24 {
            let code =
                format!("#include <stdio.h>\nint main(void){{printf(\"%d\\n\", {i});return 0;}}");
            let json = app.execute(json!({"runtime": "c", "code": code})).await;
            assert_eq!(json["run"]["stdout"], format!("{i}\n"));
            let bytes = metric(&app, "mde_compile_cache_bytes", &[]).await;
            assert!(bytes <= bound && bytes > 0.0, "{bytes} bytes after {i}");
        }
        let evicted = metric(
            &app,
            "mde_compile_cache_events_total",
            &[r#"event="evicted""#],
        )
        .await;
        assert!(evicted > 0.0, "a full cache evicts");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn java_finds_its_class_and_heaps_follow_the_memory_limit() {
    if !installed_or_skip("javac", "Java") {
        return;
    }
    bounded(240, async {
        let app = app(56700).await;
        for (code, want) in [
            (
                "public class HelloWorld { public static void main(String[] a) { System.out.println(\"hw\"); } }",
                "hw\n",
            ),
            (
                "import java.util.*;\nclass Solution {\n  public static void main(String[] args) { System.out.println(new Scanner(System.in).nextInt() * 2); }\n}",
                "42\n",
            ),
        ] {
            let json = app
                .execute(json!({"runtime": "java", "code": code, "stdin": "21"}))
                .await;
            assert_eq!(json["status"], "ok", "{json}");
            assert_eq!(json["run"]["stdout"], want, "{json}");
        }
        // 2 GiB under a 256 MiB limit: the JVM's heap is sized from the limit, so Java
        // says OutOfMemoryError instead of being killed without a word.
        for alloc in [
            "byte[] b = new byte[2000000000]; System.out.println(b.length);",
            "java.util.List<byte[]> l = new java.util.ArrayList<>(); for (int i = 0; i < 2048; i++) l.add(new byte[1 << 20]); System.out.println(l.size());",
        ] {
            let code = format!("class Main {{ public static void main(String[] a) {{ {alloc} }} }}");
            let json = app
                .execute(json!({"runtime": "java", "code": code, "limits": {"memory_bytes": 268435456}}))
                .await;
            let run = &json["run"];
            let stderr = run["stderr"].as_str().unwrap_or_default();
            let message = run["message"].as_str().unwrap_or_default();
            assert!(
                stderr.contains("OutOfMemoryError") || message.contains("memory limit"),
                "{json}"
            );
            assert!(
                ["runtime_error", "memory_limit"].contains(&run["status"].as_str().unwrap_or("")),
                "{json}"
            );
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn node_heap_and_python_multiprocessing_work_in_the_sandbox() {
    bounded(120, async {
        let app = app(56800).await;
        let json = app
            .execute(json!({"runtime": "python3",
                "code": "import multiprocessing\nif __name__ == '__main__':\n    with multiprocessing.Pool(2) as p:\n        print(p.map(abs, [-1, -2, 3]))"}))
            .await;
        assert_eq!(json["run"]["stdout"], "[1, 2, 3]\n", "{json}");
        if installed_or_skip("node", "node heap") {
            let json = app
                .execute(json!({"runtime": "node", "limits": {"memory_bytes": 268435456},
                    "code": "const a = []; for (;;) a.push(new Array(1 << 16).fill(1.5));"}))
                .await;
            let run = &json["run"];
            let stderr = run["stderr"].as_str().unwrap_or_default();
            assert!(
                stderr.contains("heap out of memory") || stderr.contains("heap limit"),
                "V8 stops at its heap limit, under the memory limit: {json}"
            );
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn compile_limits_raise_or_lower_the_compile_stage_within_its_maximum() {
    if !installed_or_skip("g++", "compile_limits") {
        return;
    }
    bounded(120, async {
        let app = app(56900).await;
        let (status, json) = app
            .post(
                "/api/v1/execute",
                &json!({"runtime": "cpp", "code": CPP_DOUBLE, "compile_limits": {"wall_time_ms": 120001}}),
            )
            .await;
        assert_eq!(status, 422, "{json}");
        assert_eq!(json["code"], "limit_exceeded");
        assert!(json["message"].as_str().unwrap_or("").contains("120000"), "{json}");
        let (status, json) = app
            .post(
                "/api/v1/execute",
                &json!({"runtime": "python3", "code": "print(1)", "compile_limits": {"wall_time_ms": 1000}}),
            )
            .await;
        assert_eq!(status, 422, "{json}");
        assert!(json["message"].as_str().unwrap_or("").contains("no compile stage"));
        // Raised past the runtime's default (30 s) up to the maximum: accepted.
        let json = app
            .execute(json!({"runtime": "cpp", "code": CPP_DOUBLE, "stdin": "2",
                            "compile_limits": {"wall_time_ms": 90000, "cpu_time_ms": 90000}}))
            .await;
        assert_eq!(json["run"]["stdout"], "4\n", "{json}");
        assert_eq!(json["compile"]["wall_time_ms"].as_u64().map(|t| t < 90000), Some(true));
        // Lowered below what g++ needs: the compile stops, and says at which limit.
        let json = app
            .execute(json!({"runtime": "cpp", "code": format!("{CPP_DOUBLE}// x"),
                            "compile_limits": {"wall_time_ms": 20}}))
            .await;
        assert_eq!(json["compile"]["status"], "timeout", "{json}");
        assert!(json.get("run").is_none());
        let message = json["compile"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("wall-time limit of 20 ms"), "{json}");
    })
    .await;
}
