//! The SQLite store going away under a running sidecar: the database file deleted or
//! replaced, the disk filling up. An event is answered 202 only while it is durable in the file
//! serve is using, and `/readyz` says whether that file can take writes right now.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::util::{eventually, receiver, Sidecar};

fn async_rule(target: &str) -> String {
    format!(
        "routing_rules:\n  - event_type: user.updated\n    mode: async\n    target: {target}\n    timeout_ms: 2000\n    retry_matrix: [50]\n"
    )
}

/// The database file and its two WAL companions.
fn db_files(dir: &Path) -> [PathBuf; 3] {
    ["hookyard.db", "hookyard.db-wal", "hookyard.db-shm"].map(|f| dir.join(f))
}

fn with_suffix(p: &Path, suffix: &str) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

async fn readyz(hy: &Sidecar) -> (u16, serde_json::Value) {
    let a = hy.admin_get("/readyz").await;
    (a.status, a.json())
}

#[tokio::test]
async fn deleting_the_sqlite_file_refuses_events_with_503_and_readyz_until_restart() {
    let rx = receiver().await;
    let rule = async_rule(&format!("http://{}/u", rx.local_addr()));
    let mut hy = Sidecar::start(&rule).await;
    assert_eq!(hy.post("user.updated", "before", &[]).await.status, 202);
    eventually(Duration::from_secs(5), "first delivery", async || {
        rx.stats().delivered_ok == 1
    })
    .await;

    for f in db_files(hy.dir.path()) {
        std::fs::remove_file(&f).unwrap_or_else(|e| panic!("rm {}: {e}", f.display()));
    }
    for i in 0..20 {
        let a = hy.post("user.updated", format!("after {i}"), &[]).await;
        assert_eq!(
            a.status,
            503,
            "event {i} after the file was deleted: {}",
            String::from_utf8_lossy(&a.body)
        );
        assert_eq!(a.json()["error"], "store_unavailable");
        // Refused before anything was written: a retry cannot duplicate it.
        assert_eq!(a.json()["outcome"], "not_stored");
        assert!(a.json()["event_id"].is_string());
        assert!(a.header("retry-after").is_some());
    }
    let (status, body) = readyz(&hy).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["reason"]
            .as_str()
            .unwrap()
            .contains("deleted or replaced"),
        "{body}"
    );

    // A restart starts over on a new file at the path, and is ready again.
    hy.stop().await;
    let dir = std::mem::replace(&mut hy.dir, tempfile::tempdir().unwrap());
    let hy = Sidecar::start_in(dir, &rule).await;
    assert_eq!(readyz(&hy).await.0, 200);
    let a = hy.post("user.updated", "after restart", &[]).await;
    assert_eq!(a.status, 202);
    eventually(
        Duration::from_secs(5),
        "delivery after restart",
        async || rx.stats().delivered_ok == 2,
    )
    .await;
    assert_eq!(
        rx.stats().unique_ids,
        2,
        "nothing answered 503 was delivered"
    );
}

#[tokio::test]
async fn the_original_sqlite_file_put_back_at_its_path_is_used_again() {
    let rx = receiver().await;
    let hy = Sidecar::start(&async_rule(&format!("http://{}/u", rx.local_addr()))).await;
    let first = hy.post("user.updated", "before", &[]).await;
    assert_eq!(first.status, 202);
    let first = first.event_id();

    // Keep a second name for each file (same inode), then take the files away from the path.
    let files = db_files(hy.dir.path());
    for f in &files {
        std::fs::hard_link(f, with_suffix(f, ".keep")).unwrap();
        std::fs::remove_file(f).unwrap();
    }
    assert_eq!(hy.post("user.updated", "gone", &[]).await.status, 503);
    assert_eq!(readyz(&hy).await.0, 503);

    // The very same files back at the path: nothing was lost, so serving resumes.
    for f in &files {
        std::fs::hard_link(with_suffix(f, ".keep"), f).unwrap();
    }
    assert_eq!(readyz(&hy).await.0, 200);
    let back = hy.post("user.updated", "back", &[]).await;
    assert_eq!(back.status, 202);
    let back = back.event_id();
    for id in [first, back] {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let e = hy.admin_get(&format!("/v1/events/{id}")).await;
            if e.status == 200 && e.json()["state"] == "delivered" {
                break;
            }
            if std::time::Instant::now() > deadline {
                panic!(
                    "{id} not delivered: {} {}; receiver {:?}",
                    e.status,
                    String::from_utf8_lossy(&e.body),
                    rx.stats()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    // Nothing was disturbed: each event reached the receiver once.
    assert_eq!(rx.stats().received, 2, "{:?}", rx.stats());
}

#[tokio::test]
async fn a_sqlite_file_replaced_under_serve_is_not_written_to() {
    let rx = receiver().await;
    let hy = Sidecar::start(&async_rule(&format!("http://{}/u", rx.local_addr()))).await;
    assert_eq!(hy.post("user.updated", "before", &[]).await.status, 202);
    // Another database renamed over the path (a restore from backup, a deploy script).
    let db = hy.dir.path().join("hookyard.db");
    let other = hy.dir.path().join("other.db");
    std::fs::copy(&db, &other).unwrap();
    std::fs::rename(&other, &db).unwrap();
    let a = hy.post("user.updated", "after", &[]).await;
    assert_eq!(a.status, 503, "{}", String::from_utf8_lossy(&a.body));
    assert_eq!(readyz(&hy).await.0, 503);
}

/// A small tmpfs mounted over a temp dir, unmounted on drop.
struct SmallDisk {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
}

impl SmallDisk {
    /// `None` (after saying why) when this process may not mount.
    fn mount(test: &str, size: &str) -> Option<SmallDisk> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("SKIPPED {test}: cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN)");
            return None;
        }
        Some(SmallDisk {
            dir: Some(dir),
            path,
        })
    }

    /// Fills the disk with one file until the file system refuses more.
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let filler = self.path.join("filler");
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0u8; 16 * 1024];
        while f.write_all(&chunk).is_ok() {}
        while f.write_all(&chunk[..512]).is_ok() {}
        filler
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        drop(self.dir.take());
    }
}

#[tokio::test]
async fn a_full_disk_turns_readyz_red_and_it_recovers_once_space_is_freed() {
    let test = "a_full_disk_turns_readyz_red_and_it_recovers_once_space_is_freed";
    let Some(disk) = SmallDisk::mount(test, "16m") else {
        return;
    };
    let rx = receiver().await;
    // A tempdir handle that does not delete the mount point itself (SmallDisk owns that).
    let dir = tempfile::Builder::new().tempdir_in(&disk.path).unwrap();
    let mut hy =
        Sidecar::start_in(dir, &async_rule(&format!("http://{}/u", rx.local_addr()))).await;
    assert_eq!(hy.post("user.updated", "fits", &[]).await.status, 202);
    assert_eq!(readyz(&hy).await.0, 200);

    let filler = disk.fill();
    let body = vec![b'x'; 256 * 1024];
    let mut refused = None;
    for _ in 0..64 {
        let a = hy.post("user.updated", body.clone(), &[]).await;
        match a.status {
            202 => {}
            503 => {
                refused = Some(a);
                break;
            }
            other => panic!("unexpected {other}: {}", String::from_utf8_lossy(&a.body)),
        }
    }
    let refused = refused.expect("a full disk refuses events");
    assert_eq!(refused.json()["error"], "store_unavailable");
    let (status, body) = readyz(&hy).await;
    assert_eq!(
        status, 503,
        "a store that cannot write is not ready: {body}"
    );

    std::fs::remove_file(filler).unwrap();
    eventually(Duration::from_secs(5), "ready again", async || {
        readyz(&hy).await.0 == 200
    })
    .await;
    assert_eq!(hy.post("user.updated", "room again", &[]).await.status, 202);
    // Stopped (and dropped, being declared later) before the disk is unmounted.
    hy.stop().await;
}
