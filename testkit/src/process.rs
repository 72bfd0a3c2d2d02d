//! Processes a test starts, and what /proc says about a process.

use std::os::unix::process::CommandExt as _;
use std::process::Command;

/// Have the child killed (SIGKILL) when its parent ends: the backstop for a
/// child whose owner is never dropped (the test process killed, a panic
/// while panicking, a leak). Linux sends the signal when the *thread* that
/// spawned the child ends, so spawn from the thread that owns the child
/// (a test's own thread), not from a short-lived helper thread.
pub fn die_with_parent(cmd: &mut Command) -> &mut Command {
    let parent = std::process::id();
    // SAFETY: prctl and getppid are async-signal-safe; nothing is allocated.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have ended before the line above.
            if libc::getppid() as u32 != parent {
                libc::_exit(1);
            }
            Ok(())
        })
    }
}

/// Private memory (RssAnon) of process `pid`, in MB: what it allocated
/// itself, not shared buffers it touched.
pub fn private_mb(pid: i32) -> f64 {
    rss_fields(pid).0
}

/// (RssAnon, RssShmem) of process `pid`, in MB.
pub fn rss_fields(pid: i32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb = |field: &str| -> f64 {
        status
            .lines()
            .find(|l| l.starts_with(field))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    (kb("RssAnon:") / 1024.0, kb("RssShmem:") / 1024.0)
}
