//! Stamps the binary with the commit and date it was built from, for `hookyard --version`.
//! Outside a git checkout (a source tarball, a container build without `.git`) the commit is
//! `unknown`; `SOURCE_DATE_EPOCH` fixes the date for reproducible builds.

use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

fn main() {
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    };
    let commit = git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into());
    let built = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .map(|secs| UNIX_EPOCH + Duration::from_secs(secs))
        .unwrap_or_else(SystemTime::now);
    let date = humantime::format_rfc3339_seconds(built).to_string();
    println!("cargo:rustc-env=HOOKYARD_BUILD_COMMIT={commit}");
    println!("cargo:rustc-env=HOOKYARD_BUILD_DATE={}", &date[..10]);
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");
    // A new commit changes HEAD or the branch it points to (paths from git itself: in a
    // worktree `.git` is a file).
    for path in ["HEAD", "refs/heads"] {
        if let Some(p) = git(&["rev-parse", "--git-path", path]) {
            println!("cargo:rerun-if-changed={p}");
        }
    }
}
