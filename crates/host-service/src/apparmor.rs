//! Loads the mandelbox AppArmor profile built into this binary.
//!
//! AppArmor has no library interface worth binding; its parser is the supported way in. The
//! profile goes in on stdin, so no copy of it on disk can drift from the one built in.

use std::process::Stdio;

use tokio::io::AsyncWriteExt;

const PROFILE: &str = include_str!("../apparmor/mandelbox-apparmor-profile");

#[derive(Debug, thiserror::Error)]
pub enum AppArmorError {
    #[error("run apparmor_parser")]
    Spawn(#[from] std::io::Error),
    #[error("apparmor_parser refused the profile: {0}")]
    Refused(String),
}

/// Loads (or replaces) the profile, skipping the parser's cache.
pub async fn load_profile() -> Result<(), AppArmorError> {
    let mut child = tokio::process::Command::new("apparmor_parser")
        .arg("-Kr")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(PROFILE.as_bytes()).await?;
    }
    let output = child.wait_with_output().await?;
    if output.status.success() {
        Ok(())
    } else {
        Err(AppArmorError::Refused(
            String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        ))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_built_in_profile_names_itself_as_the_config_default() {
        assert!(super::PROFILE.contains("profile mandelbox-apparmor-profile "));
    }
}
