//! Name resolution under the egress rules, for every transport: resolve
//! like the system does, then keep only the addresses `outbox.allowed_hosts`
//! lets a connection go to (egress.rs). The address checked is the one
//! connected to, which defeats DNS rebinding.

use crate::egress::Egress;
use std::net::SocketAddr;

/// The addresses of `host` a connection may go to; `exempt` skips the
/// address check (the administrator's own proxy). The error never names
/// the addresses found: admins need not learn what internal names
/// resolve to.
pub async fn allowed_addresses(
    egress: &Egress,
    host: &str,
    port: u16,
    exempt: bool,
) -> Result<Vec<SocketAddr>, String> {
    let found: Vec<SocketAddr> =
        tokio::net::lookup_host((host, port)).await.map_err(|e| format!("cannot resolve {host}: {e}"))?.collect();
    let (allowed, refused): (Vec<SocketAddr>, Vec<SocketAddr>) =
        found.into_iter().partition(|a| exempt || egress.allowed.allows_address(a.ip()));
    if allowed.is_empty() {
        let what = if refused.is_empty() { "no address" } else { "only addresses" };
        return Err(format!("{host} resolves to {what} which outbox.allowed_hosts does not allow"));
    }
    Ok(allowed)
}
