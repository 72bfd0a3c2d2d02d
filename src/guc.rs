//! Server settings (`outbox.*`). Read on the main thread only.

use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use std::ffi::CString;

/// Databases that get a worker, comma-separated. Fixed at server start.
pub static DATABASES: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"postgres"));

/// Fallback wake-up interval of the worker; commits wake it immediately.
pub static POLL_INTERVAL_MS: GucSetting<i32> = GucSetting::<i32>::new(1000);

/// Largest payload `outbox_emit` accepts, in bytes.
pub static MAX_PAYLOAD_SIZE: GucSetting<i32> = GucSetting::<i32>::new(1024 * 1024);

/// Hosts endpoints may point at (see egress.rs); empty: any.
pub static ALLOWED_HOSTS: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c""));

/// The roles CREATE EXTENSION creates (or adopts) for its database.
pub static WRITER_ROLE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"outbox_writer"));
pub static ADMIN_ROLE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"outbox_admin"));

/// A proxy for every request (empty: none; the environment is ignored).
pub static HTTP_PROXY: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c""));

/// Events one endpoint may hold in the worker's memory at once. With one
/// event per request a lane's loaded events go out as a chain (net::Job),
/// so what a lane holds is how long the network side runs without the
/// main thread: 10,000 over 1,000 keys made chains of 5 to 10 events,
/// shorter than a step that reads.
pub static WINDOW_EVENTS: GucSetting<i32> = GucSetting::<i32>::new(50_000);

/// Payload bytes one endpoint may hold in the worker's memory at once (kB).
pub static WINDOW_KB: GucSetting<i32> = GucSetting::<i32>::new(64 * 1024);

/// Delivered events are kept at least this long (seconds), then removed by
/// table rotation.
pub static RETENTION_S: GucSetting<i32> = GucSetting::<i32>::new(60);

pub fn init() {
    GucRegistry::define_string_guc(
        c"outbox.databases",
        c"Databases in which an outbox worker runs (comma-separated).",
        c"One background worker per listed database. The extension must be created in each of them.",
        &DATABASES,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"outbox.allowed_hosts",
        c"Hosts and networks endpoints may point at (comma-separated; empty: any).",
        c"Host names, *.domain suffixes and IP networks such as 10.0.0.0/8. Checked when endpoints are created or \
          changed, before every request and for every redirect followed.",
        &ALLOWED_HOSTS,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"outbox.writer_role",
        c"The role CREATE EXTENSION outbox grants outbox_emit to, in its database.",
        c"Read at CREATE EXTENSION. Each database needs its own role: rights in one database must not reach another.",
        &WRITER_ROLE,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"outbox.admin_role",
        c"The role CREATE EXTENSION outbox grants endpoint management to, in its database.",
        c"Read at CREATE EXTENSION. Each database needs its own role: rights in one database must not reach another.",
        &ADMIN_ROLE,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"outbox.http_proxy",
        c"HTTP(S) proxy for every delivery (empty: none).",
        c"The server's HTTP_PROXY and ALL_PROXY environment variables are never used.",
        &HTTP_PROXY,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"outbox.poll_interval",
        c"How often the worker looks for work when no commit woke it.",
        c"Commits that emit events wake the worker at once; this timer is the fallback.",
        &POLL_INTERVAL_MS,
        10,
        3_600_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"outbox.max_payload_size",
        c"Largest event payload outbox_emit accepts.",
        c"Measured on the jsonb value, uncompressed.",
        &MAX_PAYLOAD_SIZE,
        1,
        i32::MAX,
        GucContext::Suset,
        GucFlags::UNIT_BYTE,
    );
    GucRegistry::define_int_guc(
        c"outbox.retention",
        c"How long delivered events are kept before table rotation removes them.",
        c"The worker switches events tables this often; the table it left is emptied once every endpoint is past it.",
        &RETENTION_S,
        1,
        7 * 86_400,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"outbox.window_events",
        c"Events one endpoint may hold in the worker's memory.",
        c"Bounds the worker's memory whatever the backlog; reading pauses when the window is full.",
        &WINDOW_EVENTS,
        10,
        1_000_000,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"outbox.window_memory",
        c"Payload memory one endpoint may hold in the worker.",
        c"Bounds the worker's memory whatever the payload sizes.",
        &WINDOW_KB,
        64,
        4 * 1024 * 1024,
        GucContext::Sighup,
        GucFlags::UNIT_KB,
    );
}

/// The databases named by `outbox.databases`, trimmed, without empties or
/// repeats, in the order given.
pub fn databases() -> Vec<String> {
    let raw = DATABASES.get().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let mut out: Vec<String> = Vec::new();
    for name in raw.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if !out.iter().any(|n| n == name) {
            out.push(name.to_string());
        }
    }
    out
}

/// The position of database `name` in `outbox.databases` (as `databases()`
/// lists them), if it is there.
pub fn database_index(name: &[u8]) -> Option<usize> {
    let raw = DATABASES.get()?;
    let mut seen: Vec<&[u8]> = Vec::new();
    for item in raw.as_bytes().split(|b| *b == b',').map(|s| s.trim_ascii()).filter(|s| !s.is_empty()) {
        if seen.contains(&item) {
            continue;
        }
        if item == name {
            return (seen.len() < crate::shmem::MAX_DATABASES).then_some(seen.len());
        }
        seen.push(item);
    }
    None
}

/// `outbox.http_proxy`, when set.
pub fn http_proxy() -> Option<String> {
    let raw = HTTP_PROXY.get()?.to_string_lossy().trim().to_string();
    (!raw.is_empty()).then_some(raw)
}

/// `outbox.allowed_hosts` as parsed; an unparsable setting allows nothing
/// (and says why).
pub fn allowed_hosts() -> Result<crate::egress::AllowList, crate::config::ConfigError> {
    let raw = ALLOWED_HOSTS.get().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    crate::egress::AllowList::parse(&raw)
}
