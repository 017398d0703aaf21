//! What the daemon writes on a zygote run's request pipe, and what the run's init writes
//! back on its status pipe. A fixed little-endian layout rather than JSON: file contents
//! are bytes, and the decoder runs in every run's init.

use crate::execution::sandbox::child::Rlimit;

/// One run, as its init reads it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct RunRequest {
    /// Size of the run's tmpfs (shared by `/box`, `/tmp` and `/dev/shm`).
    pub(crate) workdir_bytes: u64,
    pub(crate) rlimits: Vec<Rlimit>,
    /// The program's argv as the interpreter's bootstrap reads it: `[entry file, args...]`.
    pub(crate) argv: Vec<Vec<u8>>,
    /// Files to write under `/box`: (relative name, content).
    pub(crate) files: Vec<(Vec<u8>, Vec<u8>)>,
}

/// How the run ended, as its init saw it (the same fields the slot launcher reports).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Status {
    pub(crate) wait_status: i32,
    pub(crate) cpu_us: u64,
    pub(crate) maxrss_kb: u64,
}

pub(crate) const STATUS_LEN: usize = 4 + 8 + 8;

/// The byte a run's init writes on the status pipe once the run is set up, before the
/// status itself.
pub(crate) const STARTED: &[u8; 1] = b"+";

impl Status {
    // Used by the fork server, which is built for x86_64 only.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(crate) fn encode(&self) -> [u8; STATUS_LEN] {
        let mut out = [0u8; STATUS_LEN];
        out[..4].copy_from_slice(&self.wait_status.to_le_bytes());
        out[4..12].copy_from_slice(&self.cpu_us.to_le_bytes());
        out[12..].copy_from_slice(&self.maxrss_kb.to_le_bytes());
        out
    }

    pub(crate) fn decode(bytes: &[u8]) -> Option<Status> {
        let bytes: &[u8; STATUS_LEN] = bytes.try_into().ok()?;
        let (status, rest) = bytes.split_at(4);
        let (cpu, rss) = rest.split_at(8);
        Some(Status {
            wait_status: i32::from_le_bytes(status.try_into().ok()?),
            cpu_us: u64::from_le_bytes(cpu.try_into().ok()?),
            maxrss_kb: u64::from_le_bytes(rss.try_into().ok()?),
        })
    }
}

impl RunRequest {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&self.workdir_bytes.to_le_bytes());
        put_len(&mut out, self.rlimits.len());
        for l in &self.rlimits {
            out.extend_from_slice(&l.resource.to_le_bytes());
            out.extend_from_slice(&l.soft.to_le_bytes());
            out.extend_from_slice(&l.hard.to_le_bytes());
        }
        put_len(&mut out, self.argv.len());
        for arg in &self.argv {
            put_bytes(&mut out, arg);
        }
        put_len(&mut out, self.files.len());
        for (name, content) in &self.files {
            put_bytes(&mut out, name);
            put_bytes(&mut out, content);
        }
        out
    }

    /// `None` for anything truncated or malformed (the daemon wrote it, so this only
    /// happens when the daemon died mid-write).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(crate) fn decode(bytes: &[u8]) -> Option<RunRequest> {
        let mut r = Reader(bytes);
        let workdir_bytes = r.u64()?;
        let mut rlimits = Vec::new();
        for _ in 0..r.len()? {
            rlimits.push(Rlimit {
                resource: r.u32()?,
                soft: r.u64()?,
                hard: r.u64()?,
            });
        }
        let mut argv = Vec::new();
        for _ in 0..r.len()? {
            argv.push(r.bytes()?.to_vec());
        }
        let mut files = Vec::new();
        for _ in 0..r.len()? {
            let name = r.bytes()?.to_vec();
            files.push((name, r.bytes()?.to_vec()));
        }
        r.0.is_empty().then_some(RunRequest {
            workdir_bytes,
            rlimits,
            argv,
            files,
        })
    }
}

fn put_len(out: &mut Vec<u8>, n: usize) {
    out.extend_from_slice(&(n as u64).to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_len(out, bytes.len());
    out.extend_from_slice(bytes);
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    /// A count, bounded by what is left (every counted item takes at least a byte), so a
    /// corrupt count cannot make the decoder reserve or loop without end.
    fn len(&mut self) -> Option<usize> {
        let n = usize::try_from(self.u64()?).ok()?;
        (n <= self.0.len()).then_some(n)
    }

    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = self.len()?;
        self.take(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_truncations_are_refused() {
        let request = RunRequest {
            workdir_bytes: 1 << 20,
            rlimits: vec![Rlimit {
                resource: 7,
                soft: 16,
                hard: 32,
            }],
            argv: vec![b"main.py".to_vec(), b"a b".to_vec(), Vec::new()],
            files: vec![
                (b"main.py".to_vec(), b"print(1)\n".to_vec()),
                (b"d/x.bin".to_vec(), vec![0, 255, 10]),
            ],
        };
        let bytes = request.encode();
        assert_eq!(RunRequest::decode(&bytes), Some(request));
        for cut in 0..bytes.len() {
            assert_eq!(RunRequest::decode(&bytes[..cut]), None, "cut at {cut}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(RunRequest::decode(&longer), None);
    }

    #[test]
    fn statuses_round_trip() {
        let status = Status {
            wait_status: 9,
            cpu_us: 1234,
            maxrss_kb: 5678,
        };
        assert_eq!(Status::decode(&status.encode()), Some(status));
        assert_eq!(Status::decode(&[0; 3]), None);
    }
}
