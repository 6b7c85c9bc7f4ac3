//! What OpenSSH is given for a lease: a known_hosts file holding only the pinned host
//! key, a Host block for ~/.ssh/config, and the arguments of `peervm ssh`. Every value
//! from a grant is quoted, so it can fail a connection but never add an option.

use std::path::Path;

use super::keys::host_key_line;
use super::target::{SshTarget, check_word};
use super::{SshError, absolute};
use crate::secure_fs::{self, SecureFsError};

/// Writes a known_hosts file that holds exactly the pinned key for `alias`: 0600, and
/// replaced atomically when it exists.
pub fn write_known_hosts(path: &Path, alias: &str, host_key: &[u8; 32]) -> Result<(), SshError> {
    check_word("host key alias", alias)?;
    let line = format!("{alias} {}\n", host_key_line(host_key));
    secure_fs::replace_private_file(path, line.as_bytes()).map_err(|e| match e {
        SecureFsError::Io { path, source } => SshError::Io { path, source },
        other => SshError::Io { path: path.to_path_buf(), source: std::io::Error::other(other.to_string()) },
    })
}

/// One argument of an OpenSSH configuration line (a config file line or `-o`): bare when
/// it is made of plain characters, else double-quoted with `"` and `\` escaped. Control
/// characters, which no quoting can carry, become `?`.
fn config_arg(s: &str) -> String {
    let s: String = s.chars().map(|c| if c.is_control() { '?' } else { c }).collect();
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "._-/@:+,%".contains(c)) {
        return s;
    }
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// A file name for IdentityFile or UserKnownHostsFile: absolute (they are not relative
/// to the working directory in a config file) with `%` doubled (OpenSSH expands `%`
/// tokens in them), then quoted as [`config_arg`] does.
fn config_path(path: &Path) -> String {
    config_arg(&absolute(path).display().to_string().replace('%', "%%"))
}

/// The options that pin the host key and allow the lease key only, as (keyword, argument).
fn ssh_options(target: &SshTarget, known_hosts: &Path) -> Vec<(&'static str, String)> {
    vec![
        ("IdentityFile", config_path(&target.key_path)),
        ("IdentitiesOnly", "yes".into()),
        ("HostKeyAlias", config_arg(&target.alias)),
        ("UserKnownHostsFile", config_path(known_hosts)),
        ("GlobalKnownHostsFile", "/dev/null".into()),
        ("StrictHostKeyChecking", "yes".into()),
        ("HostKeyAlgorithms", "ssh-ed25519".into()),
        ("UpdateHostKeys", "no".into()),
        ("PreferredAuthentications", "publickey".into()),
        ("PubkeyAuthentication", "yes".into()),
        ("PasswordAuthentication", "no".into()),
        ("KbdInteractiveAuthentication", "no".into()),
    ]
}

/// A Host block for ~/.ssh/config (Host is the alias): HostName, Port, User, then the
/// lease key as the only identity and the pinned host key as the only accepted one.
pub fn ssh_config_block(target: &SshTarget, known_hosts: &Path) -> String {
    let mut out = format!(
        "Host {}\n    HostName {}\n    Port {}\n    User {}\n",
        config_arg(&target.alias),
        config_arg(&target.host),
        target.port,
        config_arg(&target.user),
    );
    for (k, v) in ssh_options(target, known_hosts) {
        out.push_str(&format!("    {k} {v}\n"));
    }
    out
}

/// Options of OpenSSH's `ssh` that take an argument (its getopt string).
const SSH_OPTIONS_WITH_ARGUMENT: &str = "bceilmopBDEFIJLOPQRSwW";

/// Arguments for OpenSSH's `ssh`: `-p`, the options of [`ssh_config_block`] as `-o`
/// (the identity too: `-i` would not take a `%` in the name), the options at the start
/// of `extra`, `--`, `user@host`, then the rest of `extra` (a remote command).
///
/// The pinning options come first and ssh keeps the first value it is given for an
/// option, so `extra` cannot loosen them; `--` keeps a host or user from the grant from
/// being read as an option.
pub fn openssh_args(target: &SshTarget, known_hosts: &Path, extra: &[String]) -> Vec<String> {
    let mut args = vec!["-p".to_string(), target.port.to_string()];
    for (k, v) in ssh_options(target, known_hosts) {
        args.push("-o".into());
        args.push(format!("{k}={v}"));
    }
    let mut rest = extra.iter();
    let mut command = Vec::new();
    while let Some(arg) = rest.next() {
        if arg == "--" {
            command.extend(rest.by_ref().cloned());
            break;
        }
        if !arg.starts_with('-') || arg == "-" {
            command.push(arg.clone());
            command.extend(rest.by_ref().cloned());
            break;
        }
        args.push(arg.clone());
        // In a cluster such as `-vp`, the first letter that takes an argument takes the
        // rest of the cluster, or the next argument when it ends the cluster.
        if let Some((i, c)) = arg.char_indices().skip(1).find(|(_, c)| SSH_OPTIONS_WITH_ARGUMENT.contains(*c))
            && i + c.len_utf8() == arg.len()
            && let Some(value) = rest.next()
        {
            args.push(value.clone());
        }
    }
    args.push("--".into());
    args.push(format!("{}@{}", target.user, target.host));
    args.extend(command);
    args
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    use russh::keys::PublicKey;
    use russh::keys::ssh_key::private::Ed25519Keypair;

    use super::*;
    use crate::requestor::ssh::fixtures::{mode, target};
    use crate::requestor::ssh::keys::generate_key;
    use crate::requestor::ssh::target::check_target;
    use crate::requestor::ssh::test_sshd::{guest_with_lease_key, within};

    #[test]
    fn known_hosts_pins_exactly_one_key_and_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let raw = *Ed25519Keypair::from_seed(&[5; 32]).public.as_ref();
        let kh = dir.path().join("known_hosts");
        let t = target(dir.path(), raw);
        assert_eq!(t.alias, "peervm-abababababab");
        write_known_hosts(&kh, &t.alias, &raw).unwrap();
        let line = host_key_line(&raw);
        assert!(line.starts_with("ssh-ed25519 AAAA") && !line.ends_with(' '), "{line:?}");
        assert_eq!(PublicKey::from_openssh(&line).unwrap().key_data().ed25519().unwrap().0, raw);
        assert_eq!(std::fs::read_to_string(&kh).unwrap(), format!("peervm-abababababab {line}\n"));
        assert_eq!(mode(&kh), 0o600);
        // replaced, still 0600, still one line
        let raw2 = *Ed25519Keypair::from_seed(&[6; 32]).public.as_ref();
        write_known_hosts(&kh, &t.alias, &raw2).unwrap();
        assert_eq!(std::fs::read_to_string(&kh).unwrap(), format!("peervm-abababababab {}\n", host_key_line(&raw2)));
        assert_eq!(mode(&kh), 0o600);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "a temporary file was left behind");
        assert!(matches!(write_known_hosts(&kh, "a b\n*", &raw), Err(SshError::Target(_))));
    }

    #[test]
    fn ssh_config_and_openssh_args_are_strict() {
        let dir = tempfile::tempdir().unwrap();
        let kh = dir.path().join("known_hosts");
        let t = target(dir.path(), [5; 32]);
        let block = ssh_config_block(&t, &kh);
        let key = t.key_path.display().to_string();
        let khs = kh.display().to_string();
        for want in [
            "Host peervm-abababababab\n",
            "    HostName 127.0.0.1\n",
            "    Port 2222\n",
            "    User peervm\n",
            &format!("    IdentityFile {key}\n"),
            "    IdentitiesOnly yes\n",
            "    HostKeyAlias peervm-abababababab\n",
            &format!("    UserKnownHostsFile {khs}\n"),
            "    StrictHostKeyChecking yes\n",
            "    PasswordAuthentication no\n",
            "    KbdInteractiveAuthentication no\n",
        ] {
            assert!(block.contains(want), "{want:?} missing from\n{block}");
        }
        assert!(block.starts_with("Host "));

        let args = openssh_args(&t, &kh, &[]);
        assert_eq!(&args[args.len() - 2..], ["--", "peervm@127.0.0.1"]);
        let opt = |args: &[String], o: &str| args.windows(2).any(|w| w[0] == "-o" && w[1] == o);
        for o in [
            "StrictHostKeyChecking=yes",
            "PasswordAuthentication=no",
            "KbdInteractiveAuthentication=no",
            "IdentitiesOnly=yes",
            "HostKeyAlias=peervm-abababababab",
            &format!("UserKnownHostsFile={khs}"),
            &format!("IdentityFile={key}"),
        ] {
            assert!(opt(&args, o), "{o} missing from {args:?}");
        }
        assert!(args.windows(2).any(|w| w[0] == "-p" && w[1] == "2222"));

        // the caller's options go before the destination, a command after it
        let extra: Vec<String> = ["-v", "-L", "8080:localhost:80", "-tp2200", "uname", "-a"].map(String::from).into();
        let args = openssh_args(&t, &kh, &extra);
        let dest = args.iter().position(|a| a == "peervm@127.0.0.1").unwrap();
        assert_eq!(args[dest - 1], "--");
        assert_eq!(&args[dest + 1..], ["uname", "-a"]);
        assert!(args[..dest].windows(2).any(|w| w[0] == "-L" && w[1] == "8080:localhost:80"), "{args:?}");
        assert!(args[..dest].contains(&"-tp2200".to_string()) && args[..dest].contains(&"-v".to_string()));
        let args = openssh_args(&t, &kh, &["-o".into(), "BatchMode=yes".into(), "--".into(), "-x".into()]);
        assert_eq!(&args[args.len() - 3..], ["--", "peervm@127.0.0.1", "-x"]);
        assert!(opt(&args, "BatchMode=yes"));

        // hostile values from a grant cannot add lines or options
        let mut bad = t.clone();
        bad.host = "1.2.3.4\n    ProxyCommand evil".into();
        bad.user = "-oProxyCommand=evil".into();
        let block = ssh_config_block(&bad, &kh);
        assert!(!block.lines().any(|l| l.trim_start().starts_with("ProxyCommand")), "{block}");
        assert!(block.contains("    HostName \"1.2.3.4?    ProxyCommand evil\"\n"), "{block}");
        assert!(matches!(check_target(&bad), Err(SshError::Target(_))));
        let args = openssh_args(&bad, &kh, &[]);
        assert_eq!(args[args.len() - 2], "--");

        // awkward local file names are quoted, and % is not taken for a token
        assert_eq!(config_path(Path::new("/a b/k%h\"x")), "\"/a b/k%%h\\\"x\"");
        assert_eq!(config_arg("peervm-abc"), "peervm-abc");
    }

    #[test]
    fn openssh_parses_the_arguments() {
        // OpenSSH's own parser (-G prints the resulting configuration and connects to
        // nothing). CI installs openssh-client; without ssh this test has nothing to ask.
        let probe = std::process::Command::new("ssh").arg("-V").output();
        if probe.is_err() {
            eprintln!("ssh not installed; skipping");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let spaced = dir.path().join("lease dir");
        std::fs::create_dir(&spaced).unwrap();
        let kh = spaced.join("known_hosts");
        let mut t = target(&spaced, [5; 32]);
        generate_key(&t.key_path, "x").unwrap();
        t.port = 2200;
        let mut args = vec!["-G".to_string(), "-F".into(), "/dev/null".into()];
        args.extend(openssh_args(&t, &kh, &["-o".into(), "StrictHostKeyChecking=no".into(), "true".into()]));
        let out = std::process::Command::new("ssh").args(&args).output().unwrap();
        let conf = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{}\n{conf}", String::from_utf8_lossy(&out.stderr));
        let lines: Vec<&str> = conf.lines().collect();
        for want in [
            "hostname 127.0.0.1",
            "port 2200",
            "user peervm",
            "stricthostkeychecking true",
            "passwordauthentication no",
            "kbdinteractiveauthentication no",
            "identitiesonly yes",
            "hostkeyalias peervm-abababababab",
            "hostkeyalgorithms ssh-ed25519",
            "globalknownhostsfile /dev/null",
            &format!("userknownhostsfile {}", kh.display()),
            &format!("identityfile {}", t.key_path.display()),
        ] {
            // OpenSSH versions print `yes` or `true` for StrictHostKeyChecking=yes
            let alt = want.replace("stricthostkeychecking true", "stricthostkeychecking yes");
            assert!(lines.contains(&want) || lines.contains(&alt.as_str()), "{want:?} missing from\n{conf}");
        }
    }

    /// OpenSSH itself, with [`openssh_args`] and the pinned known_hosts, against the
    /// in-process server: it runs the command with the right key and refuses another.
    #[tokio::test]
    async fn openssh_client_accepts_only_the_pinned_key() {
        if std::process::Command::new("ssh").arg("-V").output().is_err() {
            eprintln!("ssh not installed; skipping");
            return;
        }
        async fn run_ssh(t: &SshTarget, known_hosts: &Path) -> std::process::Output {
            write_known_hosts(known_hosts, &t.alias, &t.host_key).unwrap();
            let mut args = vec!["-F".to_string(), "/dev/null".into(), "-o".into(), "BatchMode=yes".into()];
            args.extend(openssh_args(t, known_hosts, &["echo hi; echo oops >&2; exit 3".to_string()]));
            let child = tokio::process::Command::new("ssh").args(&args).env_remove("SSH_AUTH_SOCK").output();
            within(child).await.unwrap()
        }
        let dir = tempfile::tempdir().unwrap();
        let kh = dir.path().join("known_hosts");
        let (_guest, t) = guest_with_lease_key(dir.path(), 1).await;
        let out = run_ssh(&t, &kh).await;
        assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(out.stdout, b"hi\n");

        let dir = tempfile::tempdir().unwrap();
        let kh = dir.path().join("known_hosts");
        let (guest, mut t) = guest_with_lease_key(dir.path(), 1).await;
        t.host_key = *Ed25519Keypair::from_seed(&[2; 32]).public.as_ref();
        let out = run_ssh(&t, &kh).await;
        assert_eq!(out.status.code(), Some(255));
        assert!(out.stdout.is_empty());
        assert!(String::from_utf8_lossy(&out.stderr).contains("Host key verification failed"));
        tokio::time::timeout(Duration::from_secs(10), guest.session).await.unwrap().unwrap();
        assert_eq!(guest.auth_attempts.load(Ordering::SeqCst), 0, "OpenSSH tried to authenticate");
    }
}
