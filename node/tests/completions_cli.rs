//! `peervm completions SHELL` and `peervm man --out DIR` as packaging runs them: what the
//! binary prints and writes, not only what the library generates.

use std::process::{Command, Output};

const PEERVM: &str = env!("CARGO_BIN_EXE_peervm");

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn completions_print_a_script_per_shell_that_names_the_subcommands() {
    for shell in ["bash", "zsh", "fish"] {
        let out = Command::new(PEERVM).args(["completions", shell]).output().expect("run peervm");
        assert!(out.status.success(), "{shell}: {}", stderr(&out));
        let script = stdout(&out);
        for word in ["offers", "provider", "lease", "exec", "doctor"] {
            assert!(script.contains(word), "{shell}: no `{word}`");
        }
        if shell == "bash" && Command::new("bash").arg("--version").output().is_ok() {
            // The script must at least parse in the shell it is for.
            let file = tempfile::NamedTempFile::new().unwrap();
            std::fs::write(file.path(), &script).unwrap();
            let check = Command::new("bash").arg("-n").arg(file.path()).output().unwrap();
            assert!(check.status.success(), "bash -n: {}", stderr(&check));
        }
    }
    let out = Command::new(PEERVM).args(["completions", "tcsh"]).output().expect("run peervm");
    assert!(!out.status.success());
    assert!(stderr(&out).contains("bash") && stderr(&out).contains("fish"), "{}", stderr(&out));
}

#[test]
fn man_writes_a_page_for_the_binary_and_each_subcommand() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("man1");
    let out = Command::new(PEERVM).args(["man", "--out"]).arg(&out_dir).output().expect("run peervm");
    assert!(out.status.success(), "{}", stderr(&out));
    let pages: Vec<String> =
        std::fs::read_dir(&out_dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    for page in ["peervm.1", "peervm-provider-run.1", "peervm-lease-create.1", "peervm-completions.1", "peervm-man.1"] {
        assert!(pages.iter().any(|p| p == page), "no {page} in {pages:?}");
    }
    assert!(stderr(&out).contains(&format!("wrote {} manual pages", pages.len())), "{}", stderr(&out));
    let main = std::fs::read_to_string(out_dir.join("peervm.1")).unwrap();
    assert!(main.contains(".TH peervm 1") && main.contains("provider"), "{main}");
    let groff = Command::new("groff").arg("--version").output().is_ok();
    for page in &pages {
        assert!(std::fs::metadata(out_dir.join(page)).unwrap().len() > 100, "{page} is empty");
        if groff {
            // Formatting with every warning on: a malformed page shows up here, not in `man`.
            let check = Command::new("groff").args(["-man", "-Tutf8", "-z", "-ww"]).arg(out_dir.join(page)).output();
            let check = check.expect("run groff");
            assert!(check.status.success() && check.stderr.is_empty(), "{page}: {}", stderr(&check));
        }
    }
}
