//! A machine that lacks what the fleet needs gets one clear message and exit code 2, before
//! anything is started.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

const BINARY: &str = env!("CARGO_BIN_EXE_local-fleet");

fn stderr_of(command: &mut Command) -> (Option<i32>, String) {
    let output = command.output().expect("run local-fleet");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn without_a_docker_engine_it_says_to_install_and_start_one() {
    let (code, stderr) =
        stderr_of(Command::new(BINARY).args(["--docker-socket", "/nonexistent/docker.sock"]));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("no Docker engine"), "{stderr}");
    assert!(stderr.contains("Install Docker Engine"), "{stderr}");
}

/// Run as root (CI is), this checks the message a user outside the docker group sees.
#[test]
fn without_permission_on_the_socket_it_says_how_to_get_it() {
    let socket = Path::new("/var/run/docker.sock");
    let world_usable = std::fs::metadata(socket)
        .map(|meta| meta.permissions().mode() & 0o006 == 0o006)
        .unwrap_or(true);
    let root = nix::unistd::geteuid().is_root();
    if !root || world_usable || !Path::new("/usr/sbin/runuser").exists() {
        eprintln!("skipped: needs root, runuser and a socket closed to other users");
        return;
    }
    // A copy nobody can execute wherever the build directory is.
    let dir = std::env::temp_dir().join(format!("whist-prereq-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod dir");
    let copy = dir.join("local-fleet");
    std::fs::copy(BINARY, &copy).expect("copy the binary");
    let (code, stderr) = stderr_of(
        Command::new("runuser")
            .args(["-u", "nobody", "--"])
            .arg(&copy),
    );
    std::fs::remove_dir_all(&dir).expect("clean up");
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("no permission on the Docker socket"),
        "{stderr}"
    );
    assert!(stderr.contains("usermod -aG docker"), "{stderr}");
}
