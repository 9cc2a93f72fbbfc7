//! Rotation without restart: the credential files are watched and, when
//! they change and the new ones are usable, applied to new overlay and
//! ingress handshakes (live connections stay). Expired join tokens are
//! pruned on the same loop.

use std::sync::Arc;
use std::time::Duration;

use dmsc_transport::Overlay;

use crate::security::Security;

/// How often expired join tokens are pruned.
const TOKEN_PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// Watches the credential files and applies changes (rotation without restart).
pub async fn watch_credentials(sec: Arc<Security>, overlay: Overlay, every: Duration) {
    let mut seen = sec.credential_stamps();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pruned = tokio::time::Instant::now();
    loop {
        tick.tick().await;
        sec.reload_if_changed(&overlay, &mut seen);
        sec.flush_sampled_failures();
        if pruned.elapsed() >= TOKEN_PRUNE_EVERY {
            pruned = tokio::time::Instant::now();
            let s = sec.clone();
            // Expired tokens go after a week; the store is rewritten (fsync).
            let _ = tokio::task::spawn_blocking(move || s.prune_tokens()).await;
        }
    }
}
