//! When an action's next attempt is due: exponential backoff with full jitter, never before
//! the receiver's `Retry-After`.

use std::time::Duration;

use crate::config::DeliveryConfig;

/// The ceiling of the delay after `attempts` failed attempts (1, 2, ...):
/// `min(retry_max, retry_base × retry_factor^(attempts-1))`.
pub fn ceiling(config: &DeliveryConfig, attempts: u32) -> Duration {
    let exponent = attempts.saturating_sub(1).min(64) as i32;
    let ms = config.retry_base_ms as f64 * config.retry_factor.powi(exponent);
    Duration::from_millis(ms.min(config.retry_max_ms as f64) as u64)
}

/// The delay before the next attempt: uniform in `[0, ceiling]` (full jitter, so retries of
/// many actions spread out), at least `retry_after`.
pub fn delay(
    config: &DeliveryConfig,
    attempts: u32,
    retry_after: Option<Duration>,
    unit: f64,
) -> Duration {
    let jittered = ceiling(config, attempts).mul_f64(unit.clamp(0.0, 1.0));
    match retry_after {
        Some(asked) => jittered.max(asked.min(Duration::from_millis(config.retry_max_ms))),
        None => jittered,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ceiling_grows_by_the_factor_up_to_the_cap() {
        let config = DeliveryConfig {
            retry_base_ms: 100,
            retry_factor: 2.0,
            retry_max_ms: 1_000,
            ..DeliveryConfig::default()
        };
        let ms = |n| ceiling(&config, n).as_millis();
        assert_eq!(
            [ms(1), ms(2), ms(3), ms(4), ms(5), ms(50)],
            [100, 200, 400, 800, 1000, 1000]
        );
        assert_eq!(delay(&config, 3, None, 0.5).as_millis(), 200);
        assert_eq!(
            delay(&config, 1, Some(Duration::from_millis(700)), 0.1).as_millis(),
            700
        );
        assert_eq!(
            delay(&config, 1, Some(Duration::from_secs(60)), 0.1).as_millis(),
            1000
        );
    }
}
