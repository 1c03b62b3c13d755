//! Retry delays: exponential growth capped at `replay.max_backoff`, with full jitter.
//!
//! The ceiling sequence comes from `backon`'s exponential builder; the delay actually used is
//! drawn uniformly from `[0, ceiling]` ("full jitter"), which spreads retries of many edge
//! boxes after a shared outage. A `Retry-After` from the upstream is a floor.

use std::time::Duration;

use backon::BackoffBuilder;
use rand::Rng;

use crate::config::ReplayConfig;

/// The ceiling of the delay before retry number `attempt` (1-based).
pub fn ceiling(config: &ReplayConfig, attempt: u32) -> Duration {
    let mut delays = backon::ExponentialBuilder::default()
        .with_min_delay(config.initial_backoff)
        .with_factor(config.backoff_multiplier)
        .with_max_delay(config.max_backoff)
        .without_max_times()
        .build();
    delays
        .nth(attempt.saturating_sub(1).min(64) as usize)
        .unwrap_or(config.max_backoff)
        .min(config.max_backoff)
}

/// The delay before retry number `attempt`: full jitter under the ceiling, at least `floor`.
pub fn delay(config: &ReplayConfig, attempt: u32, floor: Option<Duration>) -> Duration {
    let ceiling = ceiling(config, attempt);
    let ceiling_ms = crate::store::millis(ceiling);
    let jittered = Duration::from_millis(rand::rng().random_range(0..=ceiling_ms));
    match floor {
        Some(f) => jittered.max(f),
        None => jittered,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceiling_doubles_up_to_the_cap() {
        let c = ReplayConfig::default();
        assert_eq!(ceiling(&c, 1), Duration::from_millis(500));
        assert_eq!(ceiling(&c, 2), Duration::from_secs(1));
        assert_eq!(ceiling(&c, 3), Duration::from_secs(2));
        assert_eq!(ceiling(&c, 30), Duration::from_secs(300));
        assert_eq!(ceiling(&c, u32::MAX), Duration::from_secs(300));
    }

    #[test]
    fn delay_is_jittered_within_bounds_and_honours_the_floor() {
        let c = ReplayConfig::default();
        for attempt in 1..10 {
            let d = delay(&c, attempt, None);
            assert!(d <= ceiling(&c, attempt));
        }
        assert!(delay(&c, 1, Some(Duration::from_secs(9))) >= Duration::from_secs(9));
        assert_eq!(delay(&c, 1, Some(Duration::MAX)), Duration::MAX);
    }

    #[test]
    fn any_retry_after_and_config_values_saturate() {
        // A property check over random values: nothing panics, the floor holds, the ceiling
        // caps the jitter.
        let mut rng = rand::rng();
        for _ in 0..10_000 {
            let c = ReplayConfig {
                initial_backoff: Duration::from_millis(rng.random_range(0..u64::MAX)),
                max_backoff: Duration::from_millis(rng.random_range(0..u64::MAX)),
                backoff_multiplier: rng.random_range(1.0..1e6),
                ..ReplayConfig::default()
            };
            let floor = Duration::from_secs(rng.random::<u64>());
            let attempt = rng.random::<u32>();
            let d = delay(&c, attempt, Some(floor));
            assert!(d >= floor);
            assert!(delay(&c, attempt, None) <= c.max_backoff.max(ceiling(&c, attempt)));
        }
    }
}
