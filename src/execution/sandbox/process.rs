//! The `process` backend: the stage runs as a plain child process. Limits still apply
//! (rlimits, memory cgroup, per-slot uid when root), but there are no namespaces: the code
//! sees the host's files and network. For development only; the daemon warns loudly.

use std::path::Path;

use super::{SandboxBackend, SandboxCommand, SandboxError, StagePlan, base_env};
use crate::config::BackendKind;

pub struct ProcessBackend;

impl SandboxBackend for ProcessBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Process
    }

    fn build(&self, plan: &StagePlan<'_>) -> Result<SandboxCommand, SandboxError> {
        let (program, args) = plan.argv.split_first().ok_or(SandboxError::EmptyCommand)?;
        let work = plan.slot_dir.join("box");
        let mut env = base_env(plan.path, &work, &plan.slot_dir.join("tmp"));
        env.extend(plan.env.iter().map(|(k, v)| (k.into(), v.into())));
        Ok(SandboxCommand {
            oom_protected: false,
            program: Path::new(program).to_path_buf(),
            args: args.iter().map(Into::into).collect(),
            env,
            cwd: work,
            pass_fds: Vec::new(),
        })
    }
}
