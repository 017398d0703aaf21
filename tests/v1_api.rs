//! `/api/v1`: runtimes, files, stdin, args, compile stages, limits, verdicts, typed errors,
//! config-only runtimes and hot reload.

mod common;

use std::time::Duration;

use common::{TestApp, app_for_tests, app_with, bounded, installed_or_skip, test_settings};
use serde_json::{Value, json};

struct Lang {
    runtime: &'static str,
    tool: &'static str,
    hello: &'static str,
    echo: &'static str,
    broken: Option<&'static str>,
}

const LANGS: &[Lang] = &[
    Lang {
        runtime: "python3",
        tool: "python3",
        hello: "print('hello')",
        echo: "import sys\nprint(sys.stdin.read(), end='')",
        broken: None,
    },
    Lang {
        runtime: "node",
        tool: "node",
        hello: "console.log('hello')",
        echo: "process.stdin.pipe(process.stdout)",
        broken: None,
    },
    Lang {
        runtime: "bash",
        tool: "bash",
        hello: "echo hello",
        echo: "cat",
        broken: None,
    },
    Lang {
        runtime: "perl",
        tool: "perl",
        hello: "print \"hello\\n\";",
        echo: "print while <STDIN>;",
        broken: None,
    },
    Lang {
        runtime: "ruby",
        tool: "ruby",
        hello: "puts 'hello'",
        echo: "print STDIN.read",
        broken: None,
    },
    Lang {
        runtime: "php",
        tool: "php",
        hello: "<?php echo \"hello\\n\";",
        echo: "<?php echo stream_get_contents(STDIN);",
        broken: None,
    },
    Lang {
        runtime: "lua",
        tool: "lua5.4",
        hello: "print('hello')",
        echo: "io.write(io.read('a'))",
        broken: None,
    },
    Lang {
        runtime: "c",
        tool: "gcc",
        hello: "#include <stdio.h>\nint main(void){puts(\"hello\");return 0;}",
        echo: "#include <stdio.h>\nint main(void){int c;while((c=getchar())!=EOF)putchar(c);return 0;}",
        broken: Some("int main(void){return missing;}"),
    },
    Lang {
        runtime: "cpp",
        tool: "g++",
        hello: "#include <iostream>\nint main(){std::cout<<\"hello\\n\";}",
        echo: "#include <iostream>\nint main(){std::cout<<std::cin.rdbuf();}",
        broken: Some("int main(){ undefined_thing(); }"),
    },
    Lang {
        runtime: "java",
        tool: "javac",
        hello: "public class Main { public static void main(String[] a) { System.out.println(\"hello\"); } }",
        echo: "public class Main { public static void main(String[] a) throws Exception { System.in.transferTo(System.out); } }",
        broken: Some("public class Main { void f() { int x = \"no\"; } }"),
    },
    Lang {
        runtime: "rust",
        tool: "rustc",
        hello: "fn main() { println!(\"hello\"); }",
        echo: "use std::io::*; fn main() { let mut s = String::new(); stdin().read_to_string(&mut s).unwrap(); print!(\"{}\", s); }",
        broken: Some("fn main() { let x: u32 = \"no\"; }"),
    },
    Lang {
        runtime: "go",
        tool: "go",
        hello: "package main\nimport \"fmt\"\nfunc main() { fmt.Println(\"hello\") }",
        echo: "package main\nimport (\"io\"; \"os\")\nfunc main() { io.Copy(os.Stdout, os.Stdin) }",
        broken: Some("package main\nfunc main() { var x int = \"no\" }"),
    },
];

async fn check_language(name: &str) {
    let lang = LANGS.iter().find(|l| l.runtime == name).expect("listed");
    if !installed_or_skip(lang.tool, &format!("the {} toolchain", lang.runtime)) {
        return;
    }
    let t = app_for_tests().await;
    let r = t
        .execute(json!({"runtime": lang.runtime, "code": lang.hello}))
        .await;
    assert_eq!(r["status"], "ok", "{name} hello: {r}");
    assert_eq!(r["run"]["stdout"], "hello\n", "{name}: {r}");
    assert_eq!(
        r["compile"].is_object(),
        lang.broken.is_some(),
        "{name}: compile stage iff compiled"
    );

    let r = t
        .execute(
            json!({"runtime": lang.runtime, "code": lang.echo, "stdin": "line one\nline two\n"}),
        )
        .await;
    assert_eq!(
        r["run"]["stdout"], "line one\nline two\n",
        "{name} echo: {r}"
    );

    if let Some(broken) = lang.broken {
        let r = t
            .execute(json!({"runtime": lang.runtime, "code": broken}))
            .await;
        assert_eq!(r["status"], "compile_error", "{name}: {r}");
        assert_eq!(r["compile"]["status"], "compile_error");
        assert!(
            r["run"].is_null(),
            "no run stage after a failed compile: {r}"
        );
        assert!(!r["compile"]["stderr"].as_str().unwrap_or("").is_empty());
    }
}

macro_rules! language_tests {
    ($($test:ident => $runtime:literal),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $test() {
                bounded(180, check_language($runtime)).await;
            }
        )*
    };
}

language_tests!(
    lang_python3 => "python3",
    lang_node => "node",
    lang_bash => "bash",
    lang_perl => "perl",
    lang_ruby => "ruby",
    lang_php => "php",
    lang_lua => "lua",
    lang_c => "c",
    lang_cpp => "cpp",
    lang_java => "java",
    lang_rust => "rust",
    lang_go => "go",
);

#[tokio::test]
async fn several_files_args_and_an_entry_point() {
    bounded(60, async {
        let t = app_for_tests().await;
        let r = t
            .execute(json!({
                "runtime": "python",
                "files": [
                    {"name": "util/helpers.py", "content": "def greet(n):\n    return f'hi {n}'\n"},
                    {"name": "util/__init__.py", "content": ""},
                    {"name": "app.py", "content": "import sys\nfrom util.helpers import greet\nprint(greet(sys.argv[1]), len(sys.argv) - 1)"},
                    {"name": "data.bin", "content": "AAEC/w==", "encoding": "base64"}
                ],
                "entry": "app.py",
                "args": ["world", "two words"]
            }))
            .await;
        assert_eq!(r["run"]["stdout"], "hi world 2\n", "{r}");
        assert_eq!(r["runtime"], "python3", "aliases resolve to the runtime's name");

        let r = t
            .execute(json!({"runtime": "python3", "files": [
                {"name": "main.py", "content": "print(list(open('data.bin','rb').read()))"},
                {"name": "data.bin", "content": "AAEC/w==", "encoding": "base64"}]}))
            .await;
        assert_eq!(r["run"]["stdout"], "[0, 1, 2, 255]\n", "{r}");
    })
    .await;
}

#[tokio::test]
async fn binary_output_comes_back_as_base64() {
    bounded(60, async {
        let t = app_for_tests().await;
        let r = t
            .execute(json!({"code": "import sys\nsys.stdout.buffer.write(b'\\x00\\xff\\xfe')\nsys.stderr.write('plain')"}))
            .await;
        assert_eq!(r["run"]["stdout"], "AP/+");
        assert_eq!(r["run"]["stdout_encoding"], "base64");
        assert_eq!(r["run"]["stderr"], "plain");
        assert_eq!(r["run"]["stderr_encoding"], "utf8");
    })
    .await;
}

#[tokio::test]
async fn programs_start_with_default_signal_handling() {
    bounded(60, async {
        let t = app_for_tests().await;
        // With SIGPIPE ignored (Rust's start-up default leaking through exec), `yes` would
        // report a broken pipe instead of dying quietly of SIGPIPE.
        let r = t
            .execute(json!({"runtime": "bash",
                            "code": "yes | head -n 1\ngrep -E '^Sig(Ign|Blk)' /proc/self/status"}))
            .await;
        assert_eq!(r["status"], "ok", "{r}");
        assert_eq!(r["run"]["stderr"], "", "{r}");
        assert_eq!(
            r["run"]["stdout"], "y\nSigBlk:\t0000000000000000\nSigIgn:\t0000000000000000\n",
            "{r}"
        );
    })
    .await;
}

#[tokio::test]
async fn exit_codes_above_128_are_not_mistaken_for_signals() {
    bounded(60, async {
        let t = app_for_tests().await;
        // bubblewrap alone reports SIGKILL as 137: the helper's exact status must win.
        for code in [129, 137, 139, 192] {
            let r = t
                .execute(json!({"code": format!("import sys\nsys.exit({code})")}))
                .await;
            assert_eq!(r["run"]["exit_code"], code, "{r}");
            assert!(r["run"]["signal"].is_null(), "{r}");
            assert_eq!(r["status"], "runtime_error", "{r}");
        }
        let r = t
            .execute(json!({"code": "import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)"}))
            .await;
        assert_eq!(r["run"]["signal"], 11, "{r}");
        assert!(r["run"]["exit_code"].is_null(), "{r}");
        // The seed contract: the exit code itself, not minus a signal number.
        let r = t.submit("import sys\nsys.exit(137)", None).await;
        assert_eq!(r["return_code"], 137, "{r}");
        // A compiled program's run stage starts its own sandbox after the compile one.
        if installed_or_skip("gcc", "the C part") {
            let r = t
                .execute(json!({"runtime": "c", "code": "int main(void) { return 130; }"}))
                .await;
            assert_eq!(r["run"]["exit_code"], 130, "{r}");
            assert!(r["run"]["signal"].is_null(), "{r}");
        }
    })
    .await;
}

#[tokio::test]
async fn results_carry_exit_signal_times_and_memory() {
    bounded(60, async {
        let t = app_for_tests().await;
        let r = t
            .execute(json!({"code": "import os, signal\nos.kill(os.getpid(), signal.SIGTERM)"}))
            .await;
        assert_eq!(r["status"], "runtime_error", "{r}");
        assert_eq!(r["run"]["signal"], 15, "{r}");
        assert!(r["run"]["exit_code"].is_null());

        let r = t
            .execute(json!({"code": "x = sum(range(3_000_000))\nprint(x > 0)"}))
            .await;
        let run = &r["run"];
        assert_eq!(run["exit_code"], 0);
        assert!(run["wall_time_ms"].as_u64().is_some());
        assert!(run["cpu_time_ms"].as_u64().unwrap_or(0) > 0, "{r}");
        assert!(
            run["peak_memory_bytes"].as_u64().unwrap_or(0) > 1_000_000,
            "{r}"
        );
    })
    .await;
}

#[tokio::test]
async fn expected_output_gives_a_verdict() {
    bounded(60, async {
        let t = app_for_tests().await;
        let ok = t
            .execute(json!({"code": "print('42   ')\nprint()", "expected_output": "42\n"}))
            .await;
        assert_eq!(ok["verdict"], "accepted", "{ok}");
        let wrong = t
            .execute(json!({"code": "print(41)", "expected_output": "42"}))
            .await;
        assert_eq!(wrong["verdict"], "wrong_answer");
        let crashed = t
            .execute(json!({"code": "1/0", "expected_output": "42"}))
            .await;
        assert!(
            crashed["verdict"].is_null(),
            "no verdict when the run failed"
        );
    })
    .await;
}

async fn expect_422(t: &common::TestApp, body: Value, code: &str, mentions: &str) {
    let (status, err) = t.post("/api/v1/execute", &body).await;
    assert_eq!(status, 422, "{err}");
    assert_eq!(err["code"], code, "{err}");
    assert!(
        err["message"].as_str().unwrap_or("").contains(mentions),
        "{err}"
    );
}

#[tokio::test]
async fn invalid_requests_get_typed_errors() {
    bounded(60, async {
        let t = app_for_tests().await;
        for bad in ["/etc/passwd", "../escape.py", "a/../../b.py", ""] {
            expect_422(
                &t,
                json!({"files": [{"name": bad, "content": "x"}]}),
                "invalid_request",
                "files[0]",
            )
            .await;
        }
        expect_422(
            &t,
            json!({"files": [{"name": "a.py", "content": "x"}, {"name": "a.py", "content": "y"}]}),
            "invalid_request",
            "duplicate",
        )
        .await;
        expect_422(
            &t,
            json!({"files": [{"content": "!!", "encoding": "base64"}]}),
            "invalid_request",
            "base64",
        )
        .await;
        expect_422(
            &t,
            json!({"code": "x", "files": []}),
            "invalid_request",
            "either",
        )
        .await;
        expect_422(&t, json!({}), "invalid_request", "files").await;
        expect_422(
            &t,
            json!({"code": "x", "entry": "nope.py"}),
            "invalid_request",
            "nope.py",
        )
        .await;
        expect_422(
            &t,
            json!({"code": "x", "limits": {"wall_time_ms": 10_000_000}}),
            "limit_exceeded",
            "60000",
        )
        .await;
        expect_422(
            &t,
            json!({"code": "x", "limits": {"memory_bytes": 1}}),
            "limit_exceeded",
            "minimum",
        )
        .await;
        expect_422(
            &t,
            json!({"files": [{"name": "a", "content": "x"}, {"name": "a/b", "content": "y"}]}),
            "invalid_request",
            "collide",
        )
        .await;
        expect_422(
            &t,
            json!({"code": "#".repeat(1_500_000), "limits": {"workdir_bytes": 1 << 20}}),
            "invalid_request",
            "workdir_bytes",
        )
        .await;
        // Under 1 MiB of bytes, but a tmpfs stores each of these 63 files in five 4 KiB
        // pages: 1.23 MiB, which could not all be written.
        let mut files = vec![json!({"name": "main.py", "content": "print(1)"})];
        files.extend(
            (0..63).map(|i| json!({"name": format!("f{i}"), "content": "x".repeat(16_385)})),
        );
        expect_422(
            &t,
            json!({"files": files, "limits": {"workdir_bytes": 1 << 20}}),
            "invalid_request",
            "whole memory pages",
        )
        .await;
        // None of that upset the slots: the next run is normal.
        let r = t.execute(json!({"code": "print('still fine')"})).await;
        assert_eq!(r["run"]["stdout"], "still fine\n");
        expect_422(
            &t,
            json!({"code": "x", "runtime": "brainfuck"}),
            "unknown_runtime",
            "brainfuck",
        )
        .await;
        expect_422(
            &t,
            json!({"code": "x", "version": "2.7"}),
            "version_mismatch",
            "2.7",
        )
        .await;
        let (status, err) = t.post_raw("/api/v1/execute", "[1,2").await;
        assert_eq!(status, 400, "{err}");
        assert_eq!(err["code"], "bad_request");
    })
    .await;
}

#[tokio::test]
async fn version_selectors_match_prefixes() {
    bounded(60, async {
        let t = app_for_tests().await;
        let (_, list) = t.get("/api/v1/runtimes").await;
        let list: Value = serde_json::from_str(&list).expect("json");
        let py = list
            .as_array()
            .and_then(|l| l.iter().find(|r| r["name"] == "python3"))
            .expect("python3")
            .clone();
        let version = py["version"]
            .as_str()
            .expect("detected version")
            .to_string();
        let major = version.split('.').next().expect("major");
        let r = t
            .execute(json!({"code": "print(1)", "version": major}))
            .await;
        assert_eq!(r["version"], version.as_str());
        assert_eq!(py["default"], true);
        assert_eq!(py["compiled"], false);
        assert_eq!(py["warm"], true);
        assert!(py["limits"]["wall_time_ms"].as_u64().is_some());
        assert!(py["max_limits"]["memory_bytes"].as_u64().is_some());
        let c = list
            .as_array()
            .and_then(|l| l.iter().find(|r| r["name"] == "c"))
            .expect("c");
        assert_eq!(c["compiled"], true);
        assert_eq!(c["warm"], false);
        assert!(c["compile_limits"]["memory_bytes"].as_u64().is_some());
    })
    .await;
}

#[tokio::test]
async fn requests_may_raise_limits_up_to_the_maximum() {
    bounded(60, async {
        let t = app_for_tests().await;
        let r = t
            .execute(
                json!({"code": "import time; time.sleep(0.2); print('done')",
                            "limits": {"wall_time_ms": 20000, "memory_bytes": 512 * 1024 * 1024}}),
            )
            .await;
        assert_eq!(r["run"]["stdout"], "done\n");
        let r = t
            .execute(json!({"code": "import time; time.sleep(5)", "limits": {"wall_time_ms": 300}}))
            .await;
        assert_eq!(r["status"], "timeout");
        assert!(r["run"]["wall_time_ms"].as_u64().unwrap_or(9999) < 3000);
    })
    .await;
}

fn runtimes_with(extra: &str) -> String {
    let base = std::fs::read_to_string(common::repo_path("runtimes.toml")).expect("read");
    format!("{base}\n{extra}")
}

const AWK: &str = "[[runtime]]\nname = \"awk\"\nlanguage = \"awk\"\nfile_name = \"main.awk\"\nrun = [\"awk\", \"-f\", \"{file}\"]\n";

#[tokio::test]
async fn a_new_language_is_config_only() {
    bounded(60, async {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("runtimes.toml");
        std::fs::write(&file, runtimes_with(AWK)).expect("write");
        let mut s = test_settings();
        s.runtimes.file = file;
        let t = app_with(s).await;
        let r = t
            .execute(json!({"runtime": "awk", "code": "{ total += $1 } END { print total }", "stdin": "1\n2\n39\n"}))
            .await;
        assert_eq!(r["run"]["stdout"], "42\n", "{r}");
    })
    .await;
}

async fn wait_for(mut check: impl AsyncFnMut() -> bool, what: &str) {
    for _ in 0..100 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

/// python3 exactly as the repo ships it, named `name`, with `warm` and `zygote` lines
/// kept only as asked.
fn python_variant(name: &str, warm: bool, zygote: bool) -> String {
    let base = std::fs::read_to_string(common::repo_path("runtimes.toml")).expect("read");
    let entry = base
        .split("[[runtime]]")
        .find(|e| e.contains("name = \"python3\""))
        .expect("python3 entry");
    assert!(entry.contains("warm = \"python\""), "python3 ships warm");
    assert!(
        entry.contains("zygote = true"),
        "python3 ships with a zygote"
    );
    let mut entry = entry
        .replace("name = \"python3\"", &format!("name = \"{name}\""))
        .replace("aliases = [\"python\", \"py\"]", "");
    if !zygote {
        entry = entry.replace("zygote = true", "");
    }
    if !warm {
        entry = entry.replace("warm = \"python\"", "");
    }
    format!("[[runtime]]{entry}")
}

/// python3 exactly as the repo ships it, but started cold.
fn cold_python() -> String {
    python_variant("pycold", false, false)
}

#[tokio::test]
async fn warm_and_zygote_pythons_behave_like_a_cold_one() {
    bounded(90, async {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("runtimes.toml");
        let extra = format!("{}\n{}", cold_python(), python_variant("pywarm", true, false));
        std::fs::write(&file, runtimes_with(&extra)).expect("write");
        let mut s = test_settings();
        s.runtimes.file = file;
        s.execution.max_concurrent = 1;
        let t = app_with(s).await;
        let starts = async |how: &str| -> u64 {
            let metrics = t.get("/metrics").await.1;
            let series = format!("mde_run_starts_total{{how=\"{how}\",runtime=\"python3\"}} ");
            metrics
                .lines()
                .find_map(|l| l.strip_prefix(series.as_str()))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0)
        };
        let run = async |runtime: &str, code: &str, args: Value, stdin: &str| {
            let r = t
                .execute(json!({"runtime": runtime, "code": code, "args": args, "stdin": stdin}))
                .await;
            r["run"].clone()
        };
        // The warm path is the one taken: its interpreter was started with the bootstrap.
        let argv3 = "print(open('/proc/self/cmdline', 'rb').read().split(b'\\0')[3].decode())";
        run("pywarm", "pass", json!([]), "").await;
        assert_eq!(run("pywarm", argv3, json!([]), "").await["stdout"], "-c\n");
        assert_eq!(run("pycold", argv3, json!([]), "").await["stdout"], "main.py\n");
        let programs = [
            "def f():\n    raise ValueError('boom')\nf()",
            "print(\n",
            "import sys\nprint(sys.argv, __name__, __file__, sys.path[:2], sys.flags.dont_write_bytecode,\n      [m for m in ('json', 'types', 'resource') if m in sys.modules])",
            "print(type(__builtins__).__name__, type(__loader__).__name__, __spec__, __doc__)",
            "import os, sys\nprint(__annotations__, sorted(vars(sys.modules['__main__'])), os.getpgid(0), os.getsid(0))",
            "print(input()[::-1])",
            "import sys\nprint('out'); sys.exit(3)",
            "import os\nos.kill(os.getpid(), 9)",
            "import atexit, threading\natexit.register(lambda: print('bye'))\nthreading.Thread(target=lambda: print('thread')).start()",
            "import pickle\nclass P: pass\nprint(len(pickle.dumps(P())) > 0, P.__module__)",
            // What a zygote's run must renew or emulate: pid numbers, its own /proc, the
            // interpreter's shutdown (finalizers, atexit after threads, exit codes).
            "import os\nprint(os.getpid(), os.getppid(), sorted(p for p in os.listdir('/proc') if p.isdigit()))",
            "import os, threading\nprint(os.getpid() == int(os.readlink('/proc/self')), threading.current_thread().name, threading.active_count())",
            "import os, threading, time\nt = threading.Thread(target=lambda: (time.sleep(0.1), print('late thread', flush=True)))\nt.start()\nimport atexit\natexit.register(print, 'atexit after threads')",
            "class D:\n    def __del__(self):\n        print('finalized at exit')\nd = D()\nprint('main done')",
            "import sys\nsys.exit('a message')",
            "raise SystemExit(300)",
            "import sys\nprint('buffered', end='')\nsys.exit(None)",
            "import os\npid = os.fork()\nif pid == 0:\n    print('child', os.getppid())\n    os._exit(5)\n_, st = os.waitpid(pid, 0)\nprint('parent saw', os.waitstatus_to_exitcode(st))",
            "import multiprocessing as mp\nif __name__ == '__main__':\n    with mp.Pool(2) as p:\n        print(p.map(abs, [-1, -2, 3]))",
            "import signal, os\nsignal.signal(signal.SIGTERM, lambda *a: print('got term'))\nos.kill(os.getpid(), signal.SIGTERM)\nprint('after')",
            "import resource\nprint(resource.getrlimit(resource.RLIMIT_NOFILE), resource.getrlimit(resource.RLIMIT_FSIZE))",
            "import os\nprint(sorted(os.listdir('/box')), sorted(os.listdir('/tmp')), os.getcwd(), open('/proc/self/status').read().count('CapEff:\\t0000000000000000'))",
            "print(open('/proc/cmdline').read() == '', __import__('socket').gethostname())",
            "import os\ns = os.statvfs('/tmp')\nprint(s.f_files, s.f_blocks * s.f_frsize, [l.split()[1] for l in open('/proc/self/status') if l.startswith('Cap')])",
            "import sys\nsys.exit(2 ** 70)",
            "import sys\nsys.exit(2 ** 40 + 3)",
            "import sys\nsys.exit(-1)",
            "raise KeyboardInterrupt",
            "import sys\nprint('x')\nsys.stdout.close()",
            "import sys\nsys.stdout = None",
            "import builtins\nbuiltins.f = open(1, 'w', closefd=False)\nbuiltins.f.write('buffered in builtins\\n')\nprint('main')",
        ];
        for code in programs {
            // After pycold the one slot's sandbox is plain: a python3 run makes the next one
            // a zygote (the metrics prove the run under test came from one).
            run("python3", "pass", json!([]), "").await;
            let before = starts("zygote").await;
            let zygote = run("python3", code, json!(["a1"]), "abc\n").await;
            assert_eq!(starts("zygote").await, before + 1, "{code:?} ran from the zygote");
            run("pywarm", "pass", json!([]), "").await;
            assert_eq!(run("pywarm", argv3, json!([]), "").await["stdout"], "-c\n");
            let warm = run("pywarm", code, json!(["a1"]), "abc\n").await;
            let cold = run("pycold", code, json!(["a1"]), "abc\n").await;
            for key in ["stdout", "stderr", "exit_code", "signal", "status"] {
                assert_eq!(warm[key], cold[key], "{key} differs for {code:?}: {warm} vs {cold}");
                assert_eq!(zygote[key], cold[key], "{key} differs for {code:?}: zygote {zygote} vs cold {cold}");
            }
        }
    })
    .await;
}

/// An app serving `toml` from a temp file it re-reads every 50 ms once its reloader runs;
/// keep the returned dir alive for the test.
async fn watching_app(
    toml: &str,
    max_concurrent: Option<usize>,
) -> (TestApp, tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("runtimes.toml");
    std::fs::write(&file, toml).expect("write");
    let mut s = test_settings();
    s.runtimes.file = file.clone();
    s.runtimes.watch = true;
    s.runtimes.watch_interval_ms = 50;
    if let Some(n) = max_concurrent {
        s.execution.max_concurrent = n;
    }
    (app_with(s).await, dir, file)
}

#[tokio::test]
async fn a_reload_retires_warm_interpreters_of_the_old_definition() {
    bounded(90, async {
        let (t, _dir, file) = watching_app(&runtimes_with(""), Some(1)).await;
        let _watcher = t.app.spawn_reloader();
        let mark = json!({"code": "import os\nprint(os.environ.get('MDE_MARK'))"});
        assert_eq!(t.execute(mark.clone()).await["run"]["stdout"], "None\n");
        // The slot now holds an interpreter started with the old environment.
        let edited = runtimes_with("").replace(
            "PYTHONIOENCODING = \"utf-8\" }",
            "PYTHONIOENCODING = \"utf-8\", MDE_MARK = \"new\" }",
        );
        assert!(
            edited.contains("MDE_MARK"),
            "the python3 entry's env line changed"
        );
        std::fs::write(&file, edited).expect("write");
        wait_for(
            async || {
                t.get("/metrics")
                    .await
                    .1
                    .contains("mde_runtimes_reloads_total{result=\"success\"} 1")
            },
            "the reload",
        )
        .await;
        // The very first run after the reload must see the new definition.
        assert_eq!(t.execute(mark).await["run"]["stdout"], "new\n");
    })
    .await;
}

#[tokio::test]
async fn runtimes_toml_is_hot_reloaded_and_bad_edits_are_rejected() {
    bounded(90, async {
        let (t, _dir, file) = watching_app(&runtimes_with(""), None).await;
        let _watcher = t.app.spawn_reloader();

        // An execution in flight keeps the definitions it started with.
        let in_flight = t.execute(json!({"runtime": "python3", "code": "import time; time.sleep(1.0); print('old defs')"}));
        let edit = async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            std::fs::write(&file, runtimes_with(AWK)).expect("write");
        };
        let (r, ()) = tokio::join!(in_flight, edit);
        assert_eq!(r["run"]["stdout"], "old defs\n");
        wait_for(async || t.get("/api/v1/runtimes").await.1.contains("\"awk\""), "awk to appear").await;
        let r = t.execute(json!({"runtime": "awk", "code": "BEGIN { print 7 }"})).await;
        assert_eq!(r["run"]["stdout"], "7\n");

        // A broken file is refused: the old definitions stay, /ready and /metrics say so.
        std::fs::write(&file, "default = \"python3\"\n[[runtime]]\nname = 1\n").expect("write");
        let reload_error = async || {
            let (_, body) = t.get("/ready").await;
            serde_json::from_str::<Value>(&body).map(|v| v["last_reload_error"].clone()).unwrap_or(Value::Null)
        };
        wait_for(async || !reload_error().await.is_null(), "the failed reload to show").await;
        let (status, ready) = t.get("/ready").await;
        assert_eq!(status, 200, "still ready on the old definitions: {ready}");
        assert!(ready.contains("runtimes.toml"), "{ready}");
        let (_, metrics) = t.get("/metrics").await;
        assert!(metrics.contains("mde_runtimes_last_reload_success 0"), "{metrics}");
        assert!(metrics.contains("mde_runtimes_reloads_total{result=\"failure\"} 1"), "{metrics}");
        let r = t.execute(json!({"runtime": "awk", "code": "BEGIN { print 8 }"})).await;
        assert_eq!(r["run"]["stdout"], "8\n", "old definitions still active");

        // Fixing the file recovers.
        std::fs::write(&file, runtimes_with("")).expect("write");
        wait_for(async || reload_error().await.is_null(), "recovery").await;
        let (status, _) = t.post("/api/v1/execute", &json!({"runtime": "awk", "code": "x"})).await;
        assert_eq!(status, 422, "awk is gone after the reload");
    })
    .await;
}

#[tokio::test]
async fn a_full_queue_answers_429_with_retry_after() {
    bounded(60, async {
        let mut s = test_settings();
        s.execution.max_concurrent = 1;
        s.execution.queue_size = 1;
        let t = app_with(s).await;
        let slow = json!({"code": "import time; time.sleep(1.5)"});
        let fut1 = t.client.post("/api/v1/execute").body_json(&slow).send();
        let fut2 = t.client.post("/api/v1/execute").body_json(&slow).send();
        let third = async {
            tokio::time::sleep(Duration::from_millis(500)).await;
            t.client
                .post("/api/v1/execute")
                .body_json(&slow)
                .send()
                .await
        };
        let (r1, r2, r3) = tokio::join!(fut1, fut2, third);
        assert_eq!(r1.0.status(), 200);
        assert_eq!(r2.0.status(), 200, "the queued one runs after the first");
        assert_eq!(r3.0.status(), 429);
        assert_eq!(
            r3.0.headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok()),
            Some("1")
        );
        let body: Value = r3.0.into_body().into_json().await.expect("json");
        assert_eq!(body["code"], "busy");
        let (_, metrics) = t.get("/metrics").await;
        let busy = metrics
            .lines()
            .find(|l| l.starts_with("mde_requests_rejected_total{reason=\"busy\"}"));
        assert_eq!(
            busy,
            Some("mde_requests_rejected_total{reason=\"busy\"} 1"),
            "{metrics}"
        );
    })
    .await;
}
