//! The one check behind every test that needs root, QEMU, the guest image or network
//! namespaces (docs/testing.md, "Tests that need root").
//!
//! Such a test is marked `#[ignore = "needs root: ..."]`, so a plain `cargo test` lists it
//! as ignored with its reason instead of reporting a pass that never ran. `scripts/test`
//! runs the suite with `--include-ignored` as root; the test's first line is
//! [`Needs::require`], which fails the test, naming everything missing, when the machine
//! cannot run it. A test that was asked to run never skips, in CI or anywhere else.

use std::path::{Path, PathBuf};

/// What a test needs from the machine.
#[derive(Debug, Clone, Default)]
pub struct Needs {
    root: Option<&'static str>,
    tools: Vec<&'static str>,
    paths: Vec<(PathBuf, String)>,
}

/// Where the guest images live (`scripts/build-guest-image` writes there); the tests read
/// `$PEERVM_IMAGE_DIR` first so a developer can point them at another build.
pub fn image_dir(name: &str) -> PathBuf {
    let base = std::env::var_os("PEERVM_IMAGE_DIR").map(PathBuf::from).unwrap_or("/var/cache/peervm/images".into());
    base.join(name)
}

impl Needs {
    /// Root, for `why` (e.g. "network namespaces, nftables, cgroups").
    pub fn root(why: &'static str) -> Self {
        Self { root: Some(why), ..Self::default() }
    }

    /// Real guests: root, QEMU, iproute2, nftables, a tun device and the minimal image.
    pub fn guests() -> Self {
        Self::root("network namespaces, nftables, cgroups")
            .tools(&["qemu-system-x86_64", "qemu-img", "ip", "nft"])
            .path("/dev/net/tun", "the tun driver")
            .path(image_dir("minimal").join("manifest.json"), "scripts/build-guest-image")
    }

    /// A guest image besides `minimal` (which `guests` needs), e.g. `debian-12`.
    pub fn image(name: &str) -> Self {
        Self::default().path(image_dir(name).join("manifest.json"), format!("scripts/build-guest-image {name}"))
    }

    /// The multi-host test bed: root, iproute2 and tc.
    pub fn netns() -> Self {
        Self::root("network namespaces, veth, bridges").tools(&["ip", "tc"])
    }

    /// Programs that must be on `PATH`.
    pub fn tools(mut self, tools: &[&'static str]) -> Self {
        self.tools.extend_from_slice(tools);
        self
    }

    /// A file that must exist, and how to get it.
    pub fn path(mut self, path: impl Into<PathBuf>, hint: impl Into<String>) -> Self {
        self.paths.push((path.into(), hint.into()));
        self
    }

    /// Both sets of needs.
    pub fn and(mut self, other: Needs) -> Self {
        self.root = self.root.or(other.root);
        for tool in other.tools {
            if !self.tools.contains(&tool) {
                self.tools.push(tool);
            }
        }
        for (path, hint) in other.paths {
            if !self.paths.iter().any(|(p, _)| *p == path) {
                self.paths.push((path, hint));
            }
        }
        self
    }

    /// Everything missing on this machine, each with how to get it; empty when the test
    /// can run.
    pub fn missing(&self) -> Vec<String> {
        self.missing_with(is_root(), on_path, |path| path.exists())
    }

    fn missing_with(&self, root: bool, has_tool: impl Fn(&str) -> bool, exists: impl Fn(&Path) -> bool) -> Vec<String> {
        let mut missing = Vec::new();
        if let Some(why) = self.root
            && !root
        {
            missing.push(format!("root ({why})"));
        }
        for tool in &self.tools {
            if !has_tool(tool) {
                missing.push(format!("{tool} (scripts/install-deps)"));
            }
        }
        for (path, hint) in &self.paths {
            if !exists(path) {
                missing.push(format!("{} ({hint})", path.display()));
            }
        }
        missing
    }

    /// Fails the calling test, naming everything missing, unless the machine has it all.
    /// Call it first in a test marked `#[ignore = "needs root: ..."]`.
    #[track_caller]
    pub fn require(&self) {
        let missing = self.missing();
        assert!(
            missing.is_empty(),
            "this test needs {}; it is #[ignore]d in a plain `cargo test`, and runs as root under scripts/test \
             (cargo test -- --include-ignored)",
            missing.join(", ")
        );
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| is_executable(&dir.join(tool))))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_missing_when_everything_is_there() {
        let needs = Needs::guests();
        assert!(needs.missing_with(true, |_| true, |_| true).is_empty());
    }

    #[test]
    fn every_missing_need_is_named_with_its_fix() {
        let needs = Needs::guests().and(Needs::netns());
        let missing = needs.missing_with(false, |t| t != "nft" && t != "tc", |p| !p.ends_with("manifest.json"));
        assert_eq!(missing.len(), 4, "{missing:?}");
        assert!(missing[0].starts_with("root (network namespaces"));
        assert!(missing.iter().any(|m| m == "nft (scripts/install-deps)"));
        assert!(missing.iter().any(|m| m == "tc (scripts/install-deps)"));
        assert!(missing.iter().any(|m| m.contains("manifest.json (scripts/build-guest-image)")));
    }

    #[test]
    fn an_image_is_named_with_the_command_that_builds_it() {
        let needs = Needs::guests().and(Needs::image("debian-12"));
        let missing = needs.missing_with(true, |_| true, |p| !p.to_string_lossy().contains("debian-12"));
        assert_eq!(missing.len(), 1, "{missing:?}");
        assert!(missing[0].ends_with("debian-12/manifest.json (scripts/build-guest-image debian-12)"), "{missing:?}");
    }

    #[test]
    fn combined_needs_are_not_listed_twice() {
        let needs = Needs::guests().and(Needs::guests());
        let missing = needs.missing_with(false, |_| false, |_| false);
        assert_eq!(missing.len(), 1 + 4 + 2, "{missing:?}");
    }

    #[test]
    #[should_panic(expected = "this test needs")]
    fn require_fails_rather_than_skips() {
        Needs::root("a test of the check").path("/nonexistent/peervm-testenv", "nothing").require();
    }
}
