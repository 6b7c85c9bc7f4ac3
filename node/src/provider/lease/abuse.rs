//! Abuse detection's decision (docs/architecture.md "Abuse detection"): from two samples
//! of a guest's traffic counters, which of the operator's rules fired and what to do
//! about it. Pure: the monitor (`monitor.rs`) feeds it the hypervisor's counters and
//! `abuse_response.rs` acts on its answer.
//!
//! A rule fires when its measure reaches its threshold; a lease is acted on once per
//! rule and action: a rule that fired with `warn` fires again only if the operator has
//! since raised its action (a reload), never every tick, so a guest that keeps
//! misbehaving neither floods the audit log nor the trigger counter.

use std::collections::BTreeMap;
use std::time::Duration;

use peervm_vmm::NetUsage;
use peervm_vmm::network::INBOUND_DROP_COMMENT;

/// What a rule does when it fires, least severe first (the order is the escalation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Action {
    /// An audit record, a counted trigger and a warning in the log.
    Warn,
    /// As warn, and the guest's egress is held to `AbuseConfig::throttle_mbit`.
    Throttle,
    /// As warn, and the lease is isolated as `peervm provider isolate` does.
    Isolate,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Warn => "warn",
            Action::Throttle => "throttle",
            Action::Isolate => "isolate",
        }
    }

    pub fn parse(s: &str) -> Option<Action> {
        [Action::Warn, Action::Throttle, Action::Isolate].into_iter().find(|a| a.as_str() == s)
    }
}

/// The rules, by their name in provider.toml's `[abuse]` and in the metric's `rule` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Rule {
    /// New outbound connections per second (scans, floods of connection attempts).
    NewConnections,
    /// Distinct destination addresses of new connections within the last minute
    /// (sweeps across many hosts).
    Destinations,
    /// New connections to TCP port 25 per minute (spam).
    Smtp,
    /// Packets of the guest the isolation rules dropped, per minute (probing the host,
    /// other guests or private ranges, spoofing). Drops of what came into the guest
    /// unasked are others' doing and left out.
    Dropped,
}

impl Rule {
    pub const ALL: [Rule; 4] = [Rule::NewConnections, Rule::Destinations, Rule::Smtp, Rule::Dropped];

    pub fn as_str(self) -> &'static str {
        match self {
            Rule::NewConnections => "new_connections",
            Rule::Destinations => "destinations",
            Rule::Smtp => "smtp",
            Rule::Dropped => "dropped",
        }
    }

    /// What the measure counts, for the audit record and the log.
    pub fn unit(self) -> &'static str {
        match self {
            Rule::NewConnections => "new connections per second",
            Rule::Destinations => "distinct destinations in the last minute",
            Rule::Smtp => "new SMTP connections per minute",
            Rule::Dropped => "dropped packets per minute",
        }
    }
}

/// One rule's setting: it fires when its measure reaches `threshold` (0: never).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Threshold {
    pub threshold: u32,
    pub action: Action,
}

/// provider.toml's `[abuse]`, validated (`provider/abuse_config.rs`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AbuseConfig {
    /// How often the monitor samples every lease's usage (and so checks it).
    pub interval: Duration,
    /// The egress rate a throttled guest is held to, in Mbit/s.
    pub throttle_mbit: u32,
    pub rules: BTreeMap<Rule, Threshold>,
}

/// The defaults: every rule only warns, at thresholds far above what a well-behaved guest
/// does (README "Abuse detection" gives the reasons), so that a provider learns what its
/// guests do before it lets a rule throttle or isolate.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);
pub const DEFAULT_THROTTLE_MBIT: u32 = 1;
pub const DEFAULT_THRESHOLDS: [(Rule, u32); 4] =
    [(Rule::NewConnections, 50), (Rule::Destinations, 250), (Rule::Smtp, 20), (Rule::Dropped, 600)];

impl Default for AbuseConfig {
    fn default() -> Self {
        AbuseConfig {
            interval: DEFAULT_INTERVAL,
            throttle_mbit: DEFAULT_THROTTLE_MBIT,
            rules: DEFAULT_THRESHOLDS
                .into_iter()
                .map(|(rule, threshold)| (rule, Threshold { threshold, action: Action::Warn }))
                .collect(),
        }
    }
}

impl AbuseConfig {
    pub fn rule(&self, rule: Rule) -> Threshold {
        self.rules.get(&rule).copied().unwrap_or(Threshold { threshold: 0, action: Action::Warn })
    }
}

/// What abuse detection reads of a guest's traffic at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sample {
    /// When it was taken (the manager's clock).
    pub at_unix_ms: u64,
    pub new_connections: u64,
    pub smtp_connections: u64,
    pub recent_destinations: u64,
    /// Packets of the guest the isolation rules dropped.
    pub guest_drops: u64,
}

impl Sample {
    pub fn of(at_unix_ms: u64, net: &NetUsage) -> Sample {
        let guest_drops = net
            .dropped
            .iter()
            .filter(|(rule, _)| rule.as_str() != INBOUND_DROP_COMMENT)
            .fold(0u64, |a, (_, n)| a.saturating_add(*n));
        Sample {
            at_unix_ms,
            new_connections: net.new_connections,
            smtp_connections: net.smtp_connections,
            recent_destinations: net.recent_destinations,
            guest_drops,
        }
    }
}

/// A rule that fired: what it measured against its threshold, and its action.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Trigger {
    pub rule: Rule,
    pub value: f64,
    pub threshold: u32,
    pub action: Action,
}

/// What abuse detection remembers of one lease: its last sample and the most severe
/// action each rule has taken on it.
#[derive(Debug, Default)]
pub struct LeaseWatch {
    last: Option<Sample>,
    taken: BTreeMap<Rule, Action>,
}

impl LeaseWatch {
    /// Checks `sample` against the previous one: `None` when there is nothing to compare
    /// yet (the lease's first sample, or one no later than the last), else the rules to
    /// act on now, which are then remembered as acted on.
    pub fn observe(&mut self, config: &AbuseConfig, sample: Sample) -> Option<Vec<Trigger>> {
        let prev = match self.last {
            Some(prev) if sample.at_unix_ms <= prev.at_unix_ms => return None,
            prev => {
                self.last = Some(sample);
                prev?
            }
        };
        let secs = (sample.at_unix_ms - prev.at_unix_ms) as f64 / 1000.0;
        // a counter that went back (a guest re-adopted with a new table) counts as 0
        let per_sec = |now: u64, then: u64| now.saturating_sub(then) as f64 / secs;
        let mut fired = Vec::new();
        for rule in Rule::ALL {
            let Threshold { threshold, action } = config.rule(rule);
            if threshold == 0 {
                continue;
            }
            let value = match rule {
                Rule::NewConnections => per_sec(sample.new_connections, prev.new_connections),
                Rule::Destinations => sample.recent_destinations as f64,
                Rule::Smtp => per_sec(sample.smtp_connections, prev.smtp_connections) * 60.0,
                Rule::Dropped => per_sec(sample.guest_drops, prev.guest_drops) * 60.0,
            };
            if value < f64::from(threshold) || self.taken.get(&rule).is_some_and(|t| *t >= action) {
                continue;
            }
            self.taken.insert(rule, action);
            fired.push(Trigger { rule, value, threshold, action });
        }
        Some(fired)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: u64 = 1_000_000;

    fn config(rule: Rule, threshold: u32, action: Action) -> AbuseConfig {
        let mut c = AbuseConfig::default();
        c.rules.insert(rule, Threshold { threshold, action });
        c
    }

    fn sample(at_secs: u64, new_connections: u64) -> Sample {
        Sample { at_unix_ms: T + at_secs * 1000, new_connections, ..Sample::default() }
    }

    #[test]
    fn the_first_sample_is_only_a_baseline() {
        let mut w = LeaseWatch::default();
        assert_eq!(w.observe(&AbuseConfig::default(), sample(0, 1_000_000)), None);
        assert_eq!(w.observe(&AbuseConfig::default(), sample(10, 1_000_000)), Some(vec![]));
        // a sample no later than the last is not compared
        assert_eq!(w.observe(&AbuseConfig::default(), sample(10, 2_000_000)), None);
    }

    #[test]
    fn new_connections_are_a_rate_over_the_interval_and_fire_at_the_threshold() {
        let c = config(Rule::NewConnections, 5, Action::Isolate);
        let mut w = LeaseWatch::default();
        w.observe(&c, sample(0, 100));
        assert_eq!(w.observe(&c, sample(10, 149)), Some(vec![]), "4.9 per second");
        let fired = w.observe(&c, sample(20, 199)).unwrap();
        assert_eq!(fired, [Trigger { rule: Rule::NewConnections, value: 5.0, threshold: 5, action: Action::Isolate }]);
    }

    #[test]
    fn a_rule_acts_once_per_escalation_not_every_tick() {
        let mut c = config(Rule::NewConnections, 5, Action::Warn);
        let mut w = LeaseWatch::default();
        w.observe(&c, sample(0, 0));
        assert_eq!(w.observe(&c, sample(10, 100)).unwrap().len(), 1);
        assert_eq!(w.observe(&c, sample(20, 200)), Some(vec![]), "warned already");
        assert_eq!(w.observe(&c, sample(30, 200)), Some(vec![]), "quiet");
        assert_eq!(w.observe(&c, sample(40, 300)), Some(vec![]), "misbehaving again: still warned");
        // the operator raises the action: it fires once more, with it
        c.rules.insert(Rule::NewConnections, Threshold { threshold: 5, action: Action::Throttle });
        let fired = w.observe(&c, sample(50, 400)).unwrap();
        assert_eq!(fired.iter().map(|t| t.action).collect::<Vec<_>>(), [Action::Throttle]);
        assert_eq!(w.observe(&c, sample(60, 500)), Some(vec![]));
        // and lowering it again does not fire
        c.rules.insert(Rule::NewConnections, Threshold { threshold: 5, action: Action::Warn });
        assert_eq!(w.observe(&c, sample(70, 600)), Some(vec![]));
    }

    #[test]
    fn each_rule_measures_its_own_counter() {
        let mut c = AbuseConfig::default();
        for rule in Rule::ALL {
            c.rules.insert(rule, Threshold { threshold: 10, action: Action::Warn });
        }
        let base = Sample { at_unix_ms: T, ..Sample::default() };
        const NONE: [(Rule, f64); 0] = [];
        let fired_by = |c: &AbuseConfig, s: Sample| {
            let mut w = LeaseWatch::default();
            w.observe(c, base);
            w.observe(c, s).unwrap().iter().map(|t| (t.rule, t.value)).collect::<Vec<_>>()
        };
        let later = Sample { at_unix_ms: T + 60_000, ..base };
        assert_eq!(fired_by(&c, later), NONE);
        // 10 SMTP connections in a minute; 9 do not
        assert_eq!(fired_by(&c, Sample { smtp_connections: 10, ..later }), [(Rule::Smtp, 10.0)]);
        assert_eq!(fired_by(&c, Sample { smtp_connections: 9, ..later }), NONE);
        assert_eq!(fired_by(&c, Sample { recent_destinations: 12, ..later }), [(Rule::Destinations, 12.0)]);
        assert_eq!(fired_by(&c, Sample { guest_drops: 30, ..later }), [(Rule::Dropped, 30.0)]);
        assert_eq!(fired_by(&c, Sample { new_connections: 600, ..later }), [(Rule::NewConnections, 10.0)]);
        // a threshold of 0 is off
        c.rules.insert(Rule::Smtp, Threshold { threshold: 0, action: Action::Isolate });
        assert_eq!(fired_by(&c, Sample { smtp_connections: 1_000, ..later }), NONE);
    }

    #[test]
    fn drops_of_what_came_into_the_guest_unasked_are_not_the_guest_s() {
        let net = NetUsage {
            dropped: [
                (INBOUND_DROP_COMMENT.to_string(), 1_000),
                ("private, local and special ranges".to_string(), 7),
                ("spoofed source".to_string(), 2),
            ]
            .into(),
            new_connections: 3,
            smtp_connections: 1,
            recent_destinations: 2,
            ..NetUsage::default()
        };
        let s = Sample::of(5, &net);
        assert_eq!(
            s,
            Sample { at_unix_ms: 5, new_connections: 3, smtp_connections: 1, recent_destinations: 2, guest_drops: 9 }
        );
    }

    #[test]
    fn a_counter_that_went_back_counts_as_no_increase() {
        let c = config(Rule::NewConnections, 1, Action::Warn);
        let mut w = LeaseWatch::default();
        w.observe(&c, sample(0, 1_000));
        assert_eq!(w.observe(&c, sample(10, 5)), Some(vec![]));
    }

    #[test]
    fn defaults_only_warn() {
        let c = AbuseConfig::default();
        assert!(Rule::ALL.iter().all(|r| c.rule(*r).action == Action::Warn && c.rule(*r).threshold > 0));
        assert_eq!(Action::parse("isolate"), Some(Action::Isolate));
        assert_eq!(Action::parse("kill"), None);
        assert!(Action::Warn < Action::Throttle && Action::Throttle < Action::Isolate);
    }
}
