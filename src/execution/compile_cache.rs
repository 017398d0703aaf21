//! The compile cache: a compiled runtime's output, kept in the daemon's memory and reused
//! when exactly the same compile comes again.
//!
//! **Key.** A SHA-256 over everything that goes into a compile: the runtime's name, version,
//! compile command, environment, binds, backend and naming rule; the compile stage's limits
//! (and the work dir it gets); the entry's name; and every submitted file, name and bytes,
//! in order. All fields are length-prefixed, so no two inputs share an encoding. A change
//! of one byte, of a flag in `runtimes.toml` or of a limit is another key.
//!
//! **Isolation.** What is kept is the work dir a compile left (see `pool/artifact.rs`) and
//! its stage report. It lives outside every sandbox: a run gets a copy, root's and
//! read-only, in its own fresh work dir, so nothing a run does reaches the cache, and
//! nothing of one submission reaches another except the output of an identical build.
//!
//! **What is kept.** Successful compiles, and compiles that failed with the compiler's
//! own error (`compile_error`: same input, same error). Not timeouts, memory or output
//! kills, or internal errors, which can depend on the machine's load rather than the input.
//!
//! **Bounds.** At most `max_bytes` (content plus a fixed overhead per file); the least
//! recently used entries are evicted first; an entry larger than a quarter of the bound is
//! not kept. When `runtimes.toml` changes a runtime's definition (or drops it), its entries
//! are dropped at the reload, and in any case at its next use.
//!
//! Two identical compiles arriving together both compile (no single flight): the second
//! insert replaces the first.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

use super::observer::{CacheEvent, ExecutionObserver};
use super::pool::artifact::Artifact;
use super::report::{StageReport, StageStatus};
use super::request::ExecutionRequest;
use crate::runtimes::Runtime;

/// A cache key: the SHA-256 of a compile's inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct CacheKey([u8; 32]);

/// A compile's result: its stage report, and on success the work dir it left.
#[derive(Debug)]
pub(crate) struct BuiltOutput {
    pub(crate) report: StageReport,
    /// `None` for a failed compile.
    pub(crate) artifact: Option<Artifact>,
}

impl BuiltOutput {
    pub(crate) fn succeeded(&self) -> bool {
        self.report.status == StageStatus::Ok && self.artifact.is_some()
    }

    /// Whether this result may be kept (see the module's doc).
    pub(crate) fn cacheable(&self) -> bool {
        match self.report.status {
            StageStatus::Ok => self.artifact.is_some(),
            StageStatus::CompileError => true,
            _ => false,
        }
    }

    fn bytes(&self) -> u64 {
        let report = (self.report.stdout.len() + self.report.stderr.len()) as u64 + 1024;
        report + self.artifact.as_ref().map_or(0, Artifact::bytes)
    }
}

struct Entry {
    value: Arc<BuiltOutput>,
    bytes: u64,
    /// Its place in `by_use`.
    used: u64,
    runtime: String,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<CacheKey, Entry>,
    /// Keys by last use, oldest first.
    by_use: BTreeMap<u64, CacheKey>,
    tick: u64,
    bytes: u64,
    /// Each runtime's definition as its entries were made under.
    definitions: HashMap<String, [u8; 32]>,
}

pub(crate) struct CompileCache {
    inner: Mutex<Inner>,
    max_bytes: u64,
    observer: Arc<dyn ExecutionObserver>,
}

/// Feed `bytes` with its length first, so that no two field sequences hash alike.
fn field(hasher: &mut Sha256, bytes: &[u8]) {
    hasher.update((bytes.len() as u64).to_le_bytes());
    hasher.update(bytes);
}

/// What of a runtime's definition goes into its compiles.
pub(crate) fn definition(runtime: &Runtime) -> [u8; 32] {
    let mut h = Sha256::new();
    field(&mut h, b"mde-compile-runtime-v1");
    field(&mut h, runtime.name.as_bytes());
    field(&mut h, runtime.version.as_deref().unwrap_or("").as_bytes());
    for part in runtime.compile.iter().flatten() {
        field(&mut h, part.as_bytes());
    }
    field(&mut h, b"env");
    for (k, v) in &runtime.env {
        field(&mut h, k.as_bytes());
        field(&mut h, v.as_bytes());
    }
    field(&mut h, b"binds");
    for bind in &runtime.ro_binds {
        field(&mut h, bind.as_os_str().as_encoded_bytes());
    }
    field(&mut h, runtime.backend.as_str().as_bytes());
    field(&mut h, format!("{:?}", runtime.class_naming).as_bytes());
    h.finalize().into()
}

impl CacheKey {
    /// The key of `request`'s compile stage, whose work dir holds `workdir_bytes`.
    pub(crate) fn of(request: &ExecutionRequest, workdir_bytes: u64) -> CacheKey {
        let runtime = &request.runtime;
        let mut h = Sha256::new();
        field(&mut h, b"mde-compile-v1");
        field(&mut h, &definition(runtime));
        for (name, value) in runtime.compile_limits.entries() {
            field(&mut h, name.as_bytes());
            field(&mut h, &value.to_le_bytes());
        }
        field(&mut h, &workdir_bytes.to_le_bytes());
        field(&mut h, request.entry.as_bytes());
        field(&mut h, &(request.files.len() as u64).to_le_bytes());
        for file in &request.files {
            field(&mut h, file.name.as_bytes());
            field(&mut h, &file.content);
        }
        CacheKey(h.finalize().into())
    }
}

impl CompileCache {
    pub(crate) fn new(max_bytes: u64, observer: Arc<dyn ExecutionObserver>) -> CompileCache {
        CompileCache {
            inner: Mutex::new(Inner::default()),
            max_bytes,
            observer,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The kept result for `key`, counting a hit or a miss.
    pub(crate) fn get(&self, runtime: &Runtime, key: &CacheKey) -> Option<Arc<BuiltOutput>> {
        let mut inner = self.lock();
        self.forget_if_redefined(&mut inner, runtime);
        inner.tick += 1;
        let tick = inner.tick;
        let found = match inner.entries.get_mut(key) {
            Some(entry) => {
                let old = std::mem::replace(&mut entry.used, tick);
                let value = Arc::clone(&entry.value);
                inner.by_use.remove(&old);
                inner.by_use.insert(tick, *key);
                Some(value)
            }
            None => None,
        };
        drop(inner);
        self.observer.compile_cache(if found.is_some() {
            CacheEvent::Hit
        } else {
            CacheEvent::Miss
        });
        found
    }

    /// Keep `value` under `key` if it may be kept and fits, evicting the least recently
    /// used entries to make room.
    pub(crate) fn put(&self, runtime: &Runtime, key: CacheKey, value: Arc<BuiltOutput>) {
        let bytes = value.bytes();
        if !value.cacheable() || bytes > self.max_bytes / 4 {
            return;
        }
        let mut inner = self.lock();
        self.forget_if_redefined(&mut inner, runtime);
        if let Some(old) = inner.entries.remove(&key) {
            inner.by_use.remove(&old.used);
            inner.bytes -= old.bytes;
        }
        let mut evicted = 0;
        while inner.bytes + bytes > self.max_bytes {
            let Some((_, oldest)) = inner.by_use.pop_first() else {
                break;
            };
            if let Some(entry) = inner.entries.remove(&oldest) {
                inner.bytes -= entry.bytes;
                evicted += 1;
            }
        }
        inner.tick += 1;
        let used = inner.tick;
        inner.by_use.insert(used, key);
        inner.bytes += bytes;
        inner.entries.insert(
            key,
            Entry {
                value,
                bytes,
                used,
                runtime: runtime.name.clone(),
            },
        );
        let (total, count) = (inner.bytes, inner.entries.len());
        drop(inner);
        if evicted > 0 {
            self.observer.compile_cache(CacheEvent::Evicted(evicted));
        }
        self.observer.compile_cache_size(total, count);
    }

    /// Drop the entries of runtimes that `runtimes` defines differently now, or no longer
    /// defines (called after a reload of `runtimes.toml`).
    pub(crate) fn retain_runtimes(&self, runtimes: &[Arc<Runtime>]) {
        let current: HashMap<&str, [u8; 32]> = runtimes
            .iter()
            .map(|r| (r.name.as_str(), definition(r)))
            .collect();
        let mut inner = self.lock();
        let stale: Vec<String> = inner
            .definitions
            .iter()
            .filter(|(name, def)| current.get(name.as_str()) != Some(*def))
            .map(|(name, _)| name.clone())
            .collect();
        let mut dropped = 0;
        for name in stale {
            dropped += drop_runtime(&mut inner, &name);
        }
        let (total, count) = (inner.bytes, inner.entries.len());
        drop(inner);
        if dropped > 0 {
            self.observer.compile_cache(CacheEvent::Evicted(dropped));
            self.observer.compile_cache_size(total, count);
        }
    }

    /// Bytes and entries kept now.
    pub(crate) fn size(&self) -> (u64, usize) {
        let inner = self.lock();
        (inner.bytes, inner.entries.len())
    }

    /// A runtime used under another definition than its entries were made under (a reload
    /// the hook did not see): its entries go.
    fn forget_if_redefined(&self, inner: &mut Inner, runtime: &Runtime) {
        let def = definition(runtime);
        match inner.definitions.get(&runtime.name) {
            Some(known) if *known == def => {}
            Some(_) => {
                let dropped = drop_runtime(inner, &runtime.name);
                inner.definitions.insert(runtime.name.clone(), def);
                if dropped > 0 {
                    self.observer.compile_cache(CacheEvent::Evicted(dropped));
                    self.observer
                        .compile_cache_size(inner.bytes, inner.entries.len());
                }
            }
            None => {
                inner.definitions.insert(runtime.name.clone(), def);
            }
        }
    }
}

/// Remove every entry of runtime `name`; how many went.
fn drop_runtime(inner: &mut Inner, name: &str) -> u64 {
    let keys: Vec<CacheKey> = inner
        .entries
        .iter()
        .filter(|(_, e)| e.runtime == name)
        .map(|(k, _)| *k)
        .collect();
    for key in &keys {
        if let Some(entry) = inner.entries.remove(key) {
            inner.by_use.remove(&entry.used);
            inner.bytes -= entry.bytes;
        }
    }
    inner.definitions.remove(name);
    keys.len() as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BackendKind;
    use crate::execution::observer::NoopObserver;
    use crate::limits::Limits;

    fn runtime(flag: &str) -> Arc<Runtime> {
        Arc::new(Runtime::ad_hoc(
            "c",
            "main.c",
            &["./main"],
            Some(&["gcc", flag, "-o", "main", "{file}"]),
            BackendKind::Process,
        ))
    }

    fn request(runtime: &Arc<Runtime>, code: &str) -> ExecutionRequest {
        ExecutionRequest::single_file(Arc::clone(runtime), code.as_bytes().to_vec())
    }

    fn built(bytes: usize) -> Arc<BuiltOutput> {
        let mut report = StageReport::internal("x", Limits::default_compile());
        report.status = StageStatus::CompileError;
        report.message = None;
        report.stderr = vec![b'e'; bytes];
        Arc::new(BuiltOutput {
            report,
            artifact: None,
        })
    }

    #[test]
    fn keys_change_with_any_input() {
        let rt = runtime("-O2");
        let base = CacheKey::of(&request(&rt, "int main(){}"), 1 << 20);
        assert_eq!(base, CacheKey::of(&request(&rt, "int main(){}"), 1 << 20));
        assert_ne!(base, CacheKey::of(&request(&rt, "int main(){ }"), 1 << 20));
        assert_ne!(
            base,
            CacheKey::of(&request(&runtime("-O1"), "int main(){}"), 1 << 20)
        );
        assert_ne!(base, CacheKey::of(&request(&rt, "int main(){}"), 2 << 20));
        let mut limited = Runtime::clone(&rt);
        limited.compile_limits.memory_bytes -= 1;
        let limited = Arc::new(limited);
        assert_ne!(
            base,
            CacheKey::of(&request(&limited, "int main(){}"), 1 << 20)
        );
        // Name and content boundaries cannot be shifted into one another.
        let mut a = request(&rt, "");
        a.files[0].name = "ab".into();
        a.files[0].content = b"c".to_vec();
        let mut b = a.clone();
        b.files[0].name = "a".into();
        b.files[0].content = b"bc".to_vec();
        assert_ne!(CacheKey::of(&a, 1), CacheKey::of(&b, 1));
    }

    #[test]
    fn the_least_recently_used_go_first_and_the_bound_holds() {
        let rt = runtime("-O2");
        let cache = CompileCache::new(64 * 1024, Arc::new(NoopObserver));
        let key = |i: usize| CacheKey::of(&request(&rt, &format!("int x{i};")), 1);
        for i in 0..3 {
            cache.put(&rt, key(i), built(10_000));
        }
        assert!(
            cache.get(&rt, &key(0)).is_some(),
            "touch 0: 1 is now the oldest"
        );
        for i in 3..40 {
            cache.put(&rt, key(i), built(10_000));
            assert!(cache.size().0 <= 64 * 1024, "over the bound after {i}");
        }
        assert!(cache.get(&rt, &key(1)).is_none(), "the oldest was evicted");
        assert!(cache.get(&rt, &key(39)).is_some(), "the newest is kept");
        cache.put(&rt, key(99), built(20_000));
        assert!(
            cache.get(&rt, &key(99)).is_none(),
            "over a quarter is not kept"
        );
    }

    #[test]
    fn a_redefined_runtime_loses_its_entries() {
        let rt = runtime("-O2");
        let cache = CompileCache::new(1 << 20, Arc::new(NoopObserver));
        let key = CacheKey::of(&request(&rt, "int main(){}"), 1);
        cache.put(&rt, key, built(10));
        assert!(cache.get(&rt, &key).is_some());
        cache.retain_runtimes(std::slice::from_ref(&rt));
        assert_eq!(cache.size().1, 1, "an unchanged runtime keeps its entries");
        cache.retain_runtimes(&[runtime("-O3")]);
        assert_eq!(cache.size(), (0, 0), "a changed compile flag drops them");
        cache.put(&rt, key, built(10));
        let other = runtime("-O1");
        let _ = cache.get(&other, &CacheKey::of(&request(&other, "x"), 1));
        assert_eq!(cache.size().1, 0, "so does a use under another definition");
    }
}
