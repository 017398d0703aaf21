//! Warm interpreters: a runtime marked `warm` in runtimes.toml is started ahead, inside an
//! idle slot's prepared sandbox, and waits there for the program it will run.
//!
//! A python start-up costs about 20 ms here, most of a `print(1)` submission. The prepared
//! sandbox already moved bubblewrap's set-up off the request's path; a warm interpreter does
//! the same for the interpreter's own start-up. Each sandbox, and so each interpreter, still
//! serves one submission and is thrown away: nothing is shared between submissions.
//!
//! The stage-exec helper starts the runtime's run command with `{file}` replaced by
//! `-c BOOTSTRAP FD`. The bootstrap blocks on FD until the daemon writes the request: the
//! program's argv (the entry file and the request's args) and the stage's rlimits. It lowers
//! its limits to those (they were the runtime's maxima until then), then runs the entry
//! file as `__main__`, as `python3 main.py` would: same `sys.argv`, `sys.path[0]`,
//! `__file__`, tracebacks without the bootstrap's frames, and none of the bootstrap's
//! imports left in `sys.modules`. What differs: `/proc/self/cmdline` shows the bootstrap.

use std::os::fd::RawFd;

use crate::config::BackendKind;
use crate::execution::sandbox::child::Rlimit;
use crate::runtimes::{Runtime, WarmKind};

/// What the daemon writes to a waiting interpreter: NUL-separated fields, the rlimit count,
/// then `resource soft hard` per rlimit, then the program's argv (`[entry file, args...]`,
/// which can hold no NUL). Not JSON: importing `json` costs python 12 ms here, more than
/// half of what warming saves.
#[derive(Debug)]
pub(crate) struct WarmRequest {
    argv: Vec<String>,
    rlimits: Vec<Rlimit>,
}

impl WarmRequest {
    pub(crate) fn new(argv: Vec<String>, rlimits: &[Rlimit]) -> WarmRequest {
        WarmRequest {
            argv,
            rlimits: rlimits.to_vec(),
        }
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut fields = vec![self.rlimits.len().to_string()];
        for l in &self.rlimits {
            fields.extend([
                l.resource.to_string(),
                l.soft.to_string(),
                l.hard.to_string(),
            ]);
        }
        fields.extend(self.argv.iter().cloned());
        fields.join("\0").into_bytes()
    }
}

/// How the interpreter gets its program: from a pipe it waits on (warm), or by forking one
/// fresh sandbox per run from a fork server (zygote).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Bootstrap {
    Warm,
    Zygote,
}

/// The run command with `{file}` replaced by the bootstrap reading from `fd` (warm), or
/// serving runs on the control socket `fd` (zygote).
pub(crate) fn warm_command(
    kind: WarmKind,
    bootstrap: Bootstrap,
    run: &[String],
    fd: RawFd,
) -> Vec<String> {
    let mut argv = Vec::with_capacity(run.len() + 2);
    for arg in run {
        if arg == "{file}" {
            match kind {
                WarmKind::Python => {
                    argv.push("-c".to_owned());
                    argv.push(match bootstrap {
                        Bootstrap::Warm => format!("{PYTHON_PROLOGUE}{PYTHON_TAKE}{PYTHON_WARM}"),
                        Bootstrap::Zygote => {
                            format!("{PYTHON_PROLOGUE}{PYTHON_TAKE}{PYTHON_ZYGOTE}")
                        }
                    });
                    argv.push(fd.to_string());
                }
            }
        } else {
            argv.push(arg.clone());
        }
    }
    argv
}

/// Runs as `python3 [flags] -c BOOTSTRAP FD`. Its first act drops `sys.path[0]` (under
/// `-c` that is the work dir, where the submission's files may already be written while the
/// interpreter starts: a planted `resource.py` must never be what lowers the limits).
/// Afterwards only the excepthook wrapper that hides the bootstrap's frame is visible to
/// the program.
const PYTHON_PROLOGUE: &str = r#"import sys
if sys.path and sys.path[0] == '':
    del sys.path[0]
_mde_before = set(sys.modules)
import os as _mde_os
"#;

/// Makes the program's `__main__` from a request (rlimits, then argv) and drops every
/// module imported since `before` (a zygote run passes None: its zygote dropped them once,
/// before forking any run).
const PYTHON_TAKE: &str = r#"def _mde_take(data, before, os=_mde_os):
    head, _, rest = data.partition(b'\0')
    count = int(head)
    if count:
        import resource
        fields = rest.split(b'\0', 3 * count)
        for i in range(count):
            res, soft, hard = (int(x) for x in fields[3 * i:3 * i + 3])
            resource.setrlimit(res, (soft, hard))
        rest = fields[3 * count]
    # As os.fsdecode, in one call: a NUL byte is never inside a multi-byte sequence.
    argv = rest.decode(sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()).split('\0')
    path = os.path.abspath(argv[0])
    with open(path, 'rb') as f:
        source = f.read()
    sys.argv = argv
    sys.path.insert(0, os.path.dirname(path))
    main = type(sys)('__main__')
    # In the order python's own __main__ has them.
    main.__annotations__ = {}
    main.__builtins__ = sys.modules['builtins']
    main.__file__ = path
    main.__cached__ = None
    external = sys.modules.get('_frozen_importlib_external')
    if external is not None:
        main.__loader__ = external.SourceFileLoader('__main__', path)
    sys.modules['__main__'] = main
    default_hook = sys.excepthook
    def hook(kind, value, tb):
        while tb is not None and tb.tb_frame.f_code.co_filename == '<string>':
            tb = tb.tb_next
        default_hook(kind, value.with_traceback(tb), tb)
    sys.excepthook = hook
    if before is not None:
        for name in set(sys.modules) - before - {'__main__'}:
            del sys.modules[name]
    return compile(source, path, 'exec'), main.__dict__
"#;

/// The program's code and globals are held only by the `exec` call: at exit the
/// interpreter then clears `__main__` while stdout still works, as after `python3 main.py`
/// (a finalizer printing at exit is seen).
const PYTHON_WARM: &str = r#"def _mde_read(fd):
    import os
    with os.fdopen(fd, 'rb') as f:
        data = f.read()
    if not data:
        os._exit(0)
    return data
exec(*_mde_take(_mde_read(int(sys.argv[1])), _mde_before))
"#;

/// The fork server's loop (see `sandbox/zygote/fork_server.rs` for the calls), then the
/// program, then python's own shutdown steps in order (threads joined, atexit, the main
/// module's names cleared as the interpreter clears them so finalizers run, stdout
/// flushed) before `_exit`: the full interpreter teardown would touch, and so copy, every
/// page the run shares with its zygote, which cost more than the rest of a `print(1)`.
const PYTHON_ZYGOTE: &str = r#"import gc as _mde_gc, _io as _mde_io
def _mde_fork():
    import os, ctypes, gc
    z = ctypes.PyDLL('/.mde/zygote.so')
    api = ctypes.pythonapi
    # Every function looked up once, here: a lookup in the run would build its ctypes
    # object there, in memory the run then copies from the zygote.
    zygote_next, zygote_clone, run_enter = z.mde_zygote_next, z.mde_zygote_clone, z.mde_run_enter
    before_fork, after_parent, after_child = api.PyOS_BeforeFork, api.PyOS_AfterFork_Parent, api.PyOS_AfterFork_Child
    if z.mde_zygote_init(int(sys.argv[1])) != 0:
        os._exit(70)
    # The compiler makes its state (the AST types) on first use: once here, not per run.
    compile('def f(a, *b, k=1, **c):\n    return [x for x in b if x] or {k: f"{a!r}"}\n', '<warm-up>', 'exec')
    # The bootstrap's own imports leave sys.modules here, once, not in every run.
    for name in set(sys.modules) - _mde_before:
        del sys.modules[name]
    gc.collect()
    gc.freeze()
    while True:
        got = zygote_next()
        if got <= 0:
            os._exit(0 if got == 0 else 71)
        before_fork()
        pid = zygote_clone()
        if pid != 0:
            after_parent()
            if pid < 0:
                os._exit(72)
            continue
        after_child()
        size = run_enter()
        if size < 0:
            os._exit(74)
        data = b''
        while len(data) < size:
            chunk = os.read(3, size - len(data))
            if not chunk:
                os._exit(75)
            data += chunk
        os.close(3)
        return data
def _mde_main(code, g, before, os=_mde_os, gc=_mde_gc, iobase=_mde_io._IOBase):
    interrupted = False
    try:
        exec(code, g)
        status = 0
    except SystemExit as e:
        code = e.code
        if code is None:
            status = 0
        elif isinstance(code, int):
            # As the interpreter: a C long, then the kernel's 8 bits; -1 past a long.
            status = code & 0xff if -2 ** 63 <= code < 2 ** 63 else 255
        else:
            try:
                print(code, file=sys.stderr)
            except Exception:
                pass
            status = 1
    except BaseException as e:
        interrupted = isinstance(e, KeyboardInterrupt)
        sys.excepthook(*sys.exc_info())
        status = 1
    threading = sys.modules.get('threading')
    if threading is not None:
        threading._shutdown()
    atexit = sys.modules.get('atexit')
    if atexit is not None:
        atexit._run_exitfuncs()
    # Then as the interpreter's teardown: stdout and stderr flushed (a failing stdout makes
    # the status 120), the main module's names cleared (finalizers run), and files the
    # program left open where the teardown would still flush them: in builtins and in
    # the modules it imported (not the zygote's own).
    def flush_std(status):
        for stream in (sys.stdout, sys.stderr):
            try:
                if stream is not None and not stream.closed:
                    stream.flush()
            except Exception:
                if stream is sys.stdout and status == 0:
                    status = 120
        return status
    status = flush_std(status)
    for first in (True, False):
        for name in list(g):
            if name != '__builtins__' and (not first or (name[:1] == '_' and name[1:2] != '_')):
                g[name] = None
    gc.collect()
    spaces = [vars(sys.modules['builtins'])]
    # By name: the zygote's own modules are left untouched (not copied into the run).
    modules = sys.modules
    spaces += [getattr(modules.get(n), '__dict__', None) for n in list(modules) if n not in before]
    for space in filter(None, spaces):
        for value in list(space.values()):
            # The C base of every io class: a plain type check, not the ABC's (which
            # would grow its caches, and copy their pages, for every value seen).
            if isinstance(value, iobase):
                try:
                    if not value.closed:
                        value.flush()
                except Exception:
                    pass
    status = flush_std(status)
    if interrupted:
        import signal
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(status)
_mde_code, _mde_globals = _mde_take(_mde_fork(), None)
del _mde_take, _mde_fork
_mde_main(_mde_code, _mde_globals, _mde_before)
"#;

/// Whether idle sandboxes may keep `runtime` started (see `warm.rs`).
pub(super) fn warmable(runtime: &Runtime) -> bool {
    runtime.warm.is_some()
        && runtime.compile.is_none()
        && runtime.backend == BackendKind::Bwrap
        && runtime.availability.available
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_is_replaced_by_the_bootstrap() {
        let run = ["python3", "-B", "{file}"].map(String::from);
        let argv = warm_command(WarmKind::Python, Bootstrap::Warm, &run, 13);
        assert_eq!(argv[..3], ["python3", "-B", "-c"]);
        assert!(argv[3].contains("_mde_take"));
        assert!(!argv[3].contains("zygote"));
        assert_eq!(argv[4], "13");
        let argv = warm_command(WarmKind::Python, Bootstrap::Zygote, &run, 13);
        assert!(argv[3].contains("mde_zygote_next"));
    }

    #[test]
    fn requests_are_nul_separated_fields() {
        let limits = [Rlimit {
            resource: 7,
            soft: 16,
            hard: 32,
        }];
        let request = WarmRequest::new(vec!["main.py".into(), "a b".into()], &limits);
        assert_eq!(request.encode(), b"1\x007\x0016\x0032\x00main.py\x00a b");
    }
}
