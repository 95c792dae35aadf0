//! Checks that keep the documentation in step with the code.

/// Panics unless `guide` names every long option of `command` (as `` `--name` ``) and, when
/// `with_env`, every option's environment variable (as `` `NAME` ``).
pub fn assert_options_documented(command: &clap::Command, guide: &str, with_env: bool) {
    for arg in command.get_arguments() {
        if let Some(long) = arg.get_long() {
            assert!(
                guide.contains(&format!("`--{long}`")),
                "{}: --{long} is not documented",
                command.get_name()
            );
        }
        if with_env && let Some(env) = arg.get_env() {
            let env = env.to_string_lossy();
            assert!(
                guide.contains(&format!("`{env}`")),
                "{}: {env} is not documented",
                command.get_name()
            );
        }
    }
}
