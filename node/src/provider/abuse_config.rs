//! provider.toml's `[abuse]` section (docs/architecture.md "Abuse detection";
//! examples/provider.toml): how often leases are checked, the rate a throttled guest gets,
//! and per rule a threshold and an action. Everything absent keeps its default (every
//! rule warns; `abuse.rs` holds the values).

use std::time::Duration;

use serde::Deserialize;

use super::lease::abuse::{AbuseConfig, Action, Rule, Threshold};

/// The longest check interval: beyond an hour a rate says little about a burst.
pub const MAX_INTERVAL_SECS: u64 = 3600;
/// The highest throttle (as `[network] egress_mbit`'s own cap).
const MAX_THROTTLE_MBIT: u32 = 100_000;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAbuse {
    interval_secs: Option<u64>,
    throttle_mbit: Option<u32>,
    new_connections: Option<RawRule>,
    destinations: Option<RawRule>,
    smtp: Option<RawRule>,
    dropped: Option<RawRule>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    threshold: Option<u32>,
    action: Option<String>,
}

/// An invalid field: its name in provider.toml and why.
pub(crate) type Invalid = (&'static str, String);

/// The `[abuse]` settings, checked; `egress_mbit` is `[network] egress_mbit` (a throttle
/// must lie below it to slow a guest down).
pub(crate) fn parse_abuse(raw: RawAbuse, egress_mbit: Option<u32>) -> Result<AbuseConfig, Invalid> {
    let mut config = AbuseConfig::default();
    if let Some(secs) = raw.interval_secs {
        if !(1..=MAX_INTERVAL_SECS).contains(&secs) {
            return Err(("abuse.interval_secs", format!("must be 1..={MAX_INTERVAL_SECS}, got {secs}")));
        }
        config.interval = Duration::from_secs(secs);
    }
    if let Some(mbit) = raw.throttle_mbit {
        if !(1..=MAX_THROTTLE_MBIT).contains(&mbit) {
            return Err(("abuse.throttle_mbit", format!("must be 1..={MAX_THROTTLE_MBIT} Mbit/s, got {mbit}")));
        }
        config.throttle_mbit = mbit;
    }
    let rules = [
        (Rule::NewConnections, raw.new_connections, "abuse.new_connections"),
        (Rule::Destinations, raw.destinations, "abuse.destinations"),
        (Rule::Smtp, raw.smtp, "abuse.smtp"),
        (Rule::Dropped, raw.dropped, "abuse.dropped"),
    ];
    for (rule, raw, field) in rules {
        let Some(raw) = raw else { continue };
        let mut t: Threshold = config.rule(rule);
        if let Some(action) = &raw.action {
            t.action = Action::parse(action)
                .ok_or_else(|| (field, format!("action `{action}` is not one of warn, throttle, isolate")))?;
        }
        if let Some(threshold) = raw.threshold {
            // the set of recent destinations holds this many at most: a higher threshold
            // could never be reached
            let max = peervm_vmm::network::DESTINATIONS_MAX;
            if rule == Rule::Destinations && threshold > max {
                return Err((field, format!("threshold {threshold} is above {max}, the most the host counts")));
            }
            t.threshold = threshold;
        }
        config.rules.insert(rule, t);
    }
    let throttles = config.rules.values().any(|t| t.threshold > 0 && t.action == Action::Throttle);
    if let Some(limit) = egress_mbit
        && throttles
        && config.throttle_mbit >= limit
    {
        return Err((
            "abuse.throttle_mbit",
            format!(
                "{} Mbit/s is not below network.egress_mbit ({limit}): a throttle would not slow a guest down",
                config.throttle_mbit
            ),
        ));
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str, egress_mbit: Option<u32>) -> Result<AbuseConfig, Invalid> {
        parse_abuse(toml::from_str(text).map_err(|e| ("toml", e.to_string()))?, egress_mbit)
    }

    #[test]
    fn an_empty_section_is_the_defaults_and_only_warns() {
        assert_eq!(parse("", None).unwrap(), AbuseConfig::default());
        let c = AbuseConfig::default();
        assert_eq!(c.interval, Duration::from_secs(10));
        assert!(Rule::ALL.iter().all(|r| c.rule(*r).action == Action::Warn));
    }

    #[test]
    fn each_rule_takes_a_threshold_and_an_action_the_rest_keep_their_defaults() {
        let c = parse(
            "interval_secs = 2\nthrottle_mbit = 5\n\
             [new_connections]\nthreshold = 20\naction = \"isolate\"\n\
             [smtp]\naction = \"throttle\"\n\
             [dropped]\nthreshold = 0\n",
            Some(100),
        )
        .unwrap();
        assert_eq!((c.interval, c.throttle_mbit), (Duration::from_secs(2), 5));
        assert_eq!(c.rule(Rule::NewConnections), Threshold { threshold: 20, action: Action::Isolate });
        let smtp_default = AbuseConfig::default().rule(Rule::Smtp).threshold;
        assert_eq!(c.rule(Rule::Smtp), Threshold { threshold: smtp_default, action: Action::Throttle });
        assert_eq!(c.rule(Rule::Dropped).threshold, 0, "off");
        assert_eq!(c.rule(Rule::Destinations), AbuseConfig::default().rule(Rule::Destinations));
    }

    #[test]
    fn invalid_settings_name_their_field() {
        for (text, egress, field, says) in [
            ("interval_secs = 0", None, "abuse.interval_secs", "1..=3600"),
            ("interval_secs = 3601", None, "abuse.interval_secs", "3601"),
            ("throttle_mbit = 0", None, "abuse.throttle_mbit", "got 0"),
            ("[smtp]\naction = \"kill\"", None, "abuse.smtp", "`kill`"),
            ("[destinations]\nthreshold = 5000", None, "abuse.destinations", "4096"),
            ("throttle_mbit = 10\n[smtp]\naction = \"throttle\"", Some(10), "abuse.throttle_mbit", "egress_mbit"),
        ] {
            let (f, message) = parse(text, egress).unwrap_err();
            assert_eq!(f, field, "{text}: {message}");
            assert!(message.contains(says), "{text}: {message}");
        }
        // a throttle at the limit is fine while no rule throttles
        assert!(parse("throttle_mbit = 10", Some(10)).is_ok());
        assert_eq!(parse("[smtp]\nthreshold = -1", None).unwrap_err().0, "toml");
        assert_eq!(parse("[smtp]\nlimit = 1", None).unwrap_err().0, "toml");
    }
}
