//! Service-manager notifications (`sd_notify(3)`): readiness, status lines, reload and stop
//! announcements, and watchdog keep-alives.
//!
//! Every function here does nothing when `NOTIFY_SOCKET` is unset, so the server behaves the
//! same outside systemd. A notification that cannot be sent is logged and otherwise ignored:
//! the service manager is an observer, and losing it must never take the cache down.

use sd_notify::NotifyState;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Whether a service manager asked for notifications at all.
pub fn enabled() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some_and(|s| !s.is_empty())
}

/// Tells the service manager the service is up (after start-up or a reload), with a status line.
/// Call only once every listener is bound and the storage is open: `Type=notify` units count as
/// started, and dependent units are started, from this point.
pub fn notify_ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Updates the free-form status line shown by `systemctl status`.
pub fn notify_status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// Announces a reload (e.g. of TLS material after SIGHUP); follow it with [`notify_ready`]
/// once the new configuration is in effect, or the unit stays "reloading".
pub fn notify_reloading(status: &str) {
    if !enabled() {
        return;
    }
    // systemd matches RELOADING=1 to the reload request by this timestamp (systemd >= 253
    // requires it for Type=notify-reload; older versions ignore it).
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now, NotifyState::Status(status)]),
        Err(e) => {
            tracing::warn!(error = %e, "reading CLOCK_MONOTONIC for the reload notification");
            send(&[NotifyState::Reloading, NotifyState::Status(status)]);
        }
    }
}

/// Announces that the service is shutting down, so systemd does not treat the drain period
/// as a hang and reports "deactivating" meanwhile.
pub fn notify_stopping(status: &str) {
    send(&[NotifyState::Stopping, NotifyState::Status(status)]);
}

/// Starts `WATCHDOG=1` keep-alives at half of the period systemd asked for (`WATCHDOG_USEC`,
/// honouring `WATCHDOG_PID`), on the current tokio runtime. The pings come from an ordinary
/// task, so a runtime too wedged to schedule it stops them and systemd restarts the service,
/// which is what the watchdog is for. Returns `None` when no watchdog was requested.
pub fn spawn_watchdog() -> Option<tokio::task::JoinHandle<()>> {
    if !enabled() {
        return None;
    }
    let period = sd_notify::watchdog_enabled().filter(|p| !p.is_zero())?;
    let interval = (period / 2).max(Duration::from_millis(1));
    tracing::debug!(?period, ?interval, "systemd watchdog enabled");
    Some(tokio::spawn(async move {
        let mut ticks = tokio::time::interval(interval);
        // After a stall, one ping is enough; a burst of catch-up pings would hide nothing.
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            send(&[NotifyState::Watchdog]);
        }
    }))
}

/// Set while sends fail, so a broken socket is reported once rather than at every ping.
static FAILING: AtomicBool = AtomicBool::new(false);

fn send(states: &[NotifyState]) {
    if !enabled() {
        return;
    }
    match sd_notify::notify(states) {
        Ok(()) => {
            if FAILING.swap(false, Ordering::Relaxed) {
                tracing::info!("service manager notifications work again");
            }
        }
        Err(e) => {
            if !FAILING.swap(true, Ordering::Relaxed) {
                let what: Vec<String> = states.iter().map(|s| s.to_string()).collect();
                tracing::warn!(
                    error = %e,
                    notification = %what.join(" "),
                    "could not notify the service manager (NOTIFY_SOCKET); carrying on"
                );
            }
        }
    }
}
