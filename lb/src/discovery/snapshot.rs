//! What the lb last learned from Consul, kept in a file (`LB_SNAPSHOT_FILE`) so that an lb
//! started while Consul is unreachable serves at once: every routed service's instances as
//! Consul described them, read back through the same parsing as a live answer (so the tag
//! prefix and the grammar of the running lb apply, not those of the one that wrote it).
//!
//! Written whole to a temporary file beside it and renamed over it (a reader never sees half
//! a snapshot), at most once a second. A file that does not parse, or is not ours, is refused
//! with a log line naming it; the lb then starts empty, as without one. Knows nothing of
//! routing tables: it stores and returns Consul's entries.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use switchyard_consul::ServiceEntry;
use tokio::sync::watch;

use crate::time::unix_ms;

/// What a snapshot file says it is: a different value is someone else's file, or a format
/// this lb does not read.
const FORMAT: &str = "switchyard-lb-snapshot/1";
/// Writes are at least this far apart: under churn the file follows at this pace.
const MIN_INTERVAL: Duration = Duration::from_secs(1);

/// The routed services and their instances.
pub type Services = BTreeMap<String, Arc<Vec<ServiceEntry>>>;

#[derive(Serialize, Deserialize)]
struct File {
    format: String,
    written_unix_ms: u64,
    services: BTreeMap<String, Vec<ServiceEntry>>,
}

/// A snapshot's services and when it was written (Unix ms).
pub type Loaded = (BTreeMap<String, Vec<ServiceEntry>>, u64);

/// Reads a snapshot: `None` when there is none yet (a first start); the error says which
/// file and why, for the log.
pub fn load(path: &Path) -> Result<Option<Loaded>, String> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let file: File = serde_json::from_slice(&bytes)
        .map_err(|e| format!("{}: not a snapshot the lb wrote: {e}", path.display()))?;
    if file.format != FORMAT {
        return Err(format!(
            "{}: format {:?}, this lb reads {FORMAT:?}",
            path.display(),
            file.format
        ));
    }
    Ok(Some((file.services, file.written_unix_ms)))
}

/// Keeps `path` up to date with what `rx` holds, at most once a second, until `rx` closes.
pub fn spawn_writer(
    path: PathBuf,
    mut rx: watch::Receiver<Arc<Services>>,
    failed: prometheus::IntCounter,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while rx.changed().await.is_ok() {
            let services = rx.borrow_and_update().clone();
            let target = path.clone();
            let written = tokio::task::spawn_blocking(move || write(&target, &services)).await;
            match written {
                Ok(Ok(())) => tracing::debug!(path = %path.display(), "snapshot written"),
                Ok(Err(e)) => {
                    failed.inc();
                    tracing::warn!(path = %path.display(), error = %e, "could not write the snapshot")
                }
                Err(e) => {
                    failed.inc();
                    tracing::warn!(error = %e, "the snapshot writer failed")
                }
            }
            tokio::time::sleep(MIN_INTERVAL).await;
        }
    })
}

/// Writes the snapshot now (at shutdown), logging and counting a failure.
pub fn write_now(path: &Path, services: &Services, failed: &prometheus::IntCounter) {
    match write(path, services) {
        Ok(()) => tracing::info!(path = %path.display(), "snapshot written"),
        Err(e) => {
            failed.inc();
            tracing::warn!(path = %path.display(), error = %e, "could not write the snapshot")
        }
    }
}

/// Writes the snapshot to a temporary file beside `path`, syncs it and renames it over `path`.
fn write(path: &Path, services: &Services) -> std::io::Result<()> {
    let file = File {
        format: FORMAT.to_string(),
        written_unix_ms: unix_ms(),
        services: services
            .iter()
            .map(|(name, entries)| (name.clone(), entries.as_ref().clone()))
            .collect(),
    };
    // Named after this process: during a rolling update the old and the new replica of a
    // swarm slot share its volume, and must not write into one file at once.
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::File::create(&tmp)?;
    serde_json::to_writer(std::io::BufWriter::new(&mut f), &file)?;
    f.flush()?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_snapshots_read_back_and_foreign_files_are_refused() {
        let dir = std::env::temp_dir().join(format!("lb-snapshot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("snap.json");
        let entry: ServiceEntry = serde_json::from_value(serde_json::json!({
            "Node": {"Node": "n1", "Address": "10.0.0.1"},
            "Service": {"ID": "web-1", "Service": "web", "Tags": ["lb.route=/"], "Port": 80},
            "Checks": [{"CheckID": "c", "Status": "passing"}]
        }))
        .unwrap();
        let services: Services = [("web".to_string(), Arc::new(vec![entry.clone()]))].into();
        write(&path, &services).unwrap();
        let (back, written) = load(&path).unwrap().unwrap();
        assert_eq!(back["web"], vec![entry]);
        assert!(written > 0);

        std::fs::write(
            &path,
            b"{\"format\": \"other/2\", \"written_unix_ms\": 1, \"services\": {}}",
        )
        .unwrap();
        assert!(load(&path).unwrap_err().contains("other/2"));
        std::fs::write(&path, b"garbage").unwrap();
        let e = load(&path).unwrap_err();
        assert!(
            e.contains("snap.json") && e.contains("not a snapshot"),
            "{e}"
        );
        assert!(load(&dir.join("missing")).unwrap().is_none(), "none yet");
        assert!(load(&dir).is_err(), "a directory is no snapshot");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
