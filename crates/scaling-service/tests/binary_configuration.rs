//! The scaling-service binary refuses configurations that would open it or point it at the
//! wrong fleet: exit code 2 and a message naming the option, before it touches anything.

use std::process::Command;

/// Runs the binary with `args`, none of the service's variables inherited, and a database and
/// cloud on closed loopback ports (it must not get as far as calling them).
fn run_binary(args: &[&str]) -> (Option<i32>, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_scaling-service"))
        .args(args)
        .env_remove("APP_ENV")
        .env_remove("WHIST_AUTH_ISSUER")
        .env_remove("WHIST_LISTEN")
        .env_remove("PORT")
        .env("HASURA_URL", "http://127.0.0.1:9/v1/graphql")
        .env("WHIST_EC2_ENDPOINT", "http://127.0.0.1:9")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .output()
        .expect("runs");
    let text = String::from_utf8_lossy(&output.stdout).to_string()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status.code(), text)
}

#[test]
fn without_an_environment_it_refuses_to_start() {
    let (code, text) = run_binary(&[]);
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("--environment"), "{text}");
}

#[test]
fn local_without_an_issuer_serves_only_on_loopback() {
    // The default listen address is 0.0.0.0:7730; Heroku's PORT moves only the port.
    for args in [
        &["--environment", "local"][..],
        &["--environment", "local", "--listen", "192.0.2.10:7730"][..],
        &["--environment", "local", "--port", "5000"][..],
    ] {
        let (code, text) = run_binary(args);
        assert_eq!(code, Some(2), "{args:?}: {text}");
        assert!(
            text.contains("--auth-issuer") && text.contains("--listen is"),
            "{args:?}: {text}"
        );
    }
}

#[test]
fn outside_local_an_issuer_is_required_even_on_loopback() {
    for environment in ["dev", "staging", "prod"] {
        let (code, text) = run_binary(&["--environment", environment, "--listen", "127.0.0.1:0"]);
        assert_eq!(code, Some(2), "{environment}: {text}");
        assert!(text.contains("--auth-issuer"), "{environment}: {text}");
    }
}
