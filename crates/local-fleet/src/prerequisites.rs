//! What the local fleet needs from this machine, checked before anything starts, each failure
//! with one message that says what to do.

use std::io::ErrorKind;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::net::UnixStream;
use std::path::Path;

use host_service::runtime::docker::DockerRuntime;

/// The Docker engine answers on `socket`. Returns a connected runtime.
pub async fn docker(socket: &Path) -> anyhow::Result<DockerRuntime> {
    // A plain connect tells the common failures apart better than the engine client's errors.
    if let Err(error) = UnixStream::connect(socket) {
        let shown = socket.display();
        anyhow::bail!(match error.kind() {
            ErrorKind::NotFound => format!(
                "no Docker engine: {shown} does not exist. Install Docker Engine and start it \
                 (e.g. `sudo systemctl start docker`), or point --docker-socket at its socket."
            ),
            ErrorKind::PermissionDenied => format!(
                "no permission on the Docker socket {shown}. Add yourself to the docker group \
                 (`sudo usermod -aG docker $USER`, then log in again) or run as a user that may \
                 use Docker."
            ),
            ErrorKind::ConnectionRefused => format!(
                "the Docker engine is not running ({shown} refuses connections). Start it, e.g. \
                 `sudo systemctl start docker`."
            ),
            _ => format!("cannot reach the Docker engine at {shown}: {error}"),
        });
    }
    DockerRuntime::connect(socket).await.map_err(|error| {
        anyhow::anyhow!(
            "the Docker engine at {} does not answer: {error}",
            socket.display()
        )
    })
}

/// `address` can be listened on now; `flag` is the option that changes it.
pub fn free(address: SocketAddr, what: &str, flag: &str) -> anyhow::Result<()> {
    match TcpListener::bind(address) {
        Ok(_) => Ok(()),
        Err(error) if error.kind() == ErrorKind::AddrInUse => anyhow::bail!(
            "{address} ({what}) is already in use, perhaps by another local fleet; stop that or \
             pick another with {flag}"
        ),
        Err(error) => anyhow::bail!("cannot listen on {address} ({what}): {error}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_missing_socket_says_to_install_and_start_docker() {
        let error = docker(Path::new("/nonexistent/docker.sock"))
            .await
            .expect_err("no engine");
        let message = error.to_string();
        assert!(message.contains("no Docker engine"), "{message}");
        assert!(message.contains("start"), "{message}");
    }

    #[tokio::test]
    async fn a_socket_nobody_listens_on_says_the_engine_is_not_running() {
        let dir = std::env::temp_dir().join(format!("whist-prereq-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("docker.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).expect("bind"));
        let message = docker(&path).await.expect_err("refused").to_string();
        std::fs::remove_dir_all(&dir).expect("clean up");
        assert!(message.contains("not running"), "{message}");
    }

    #[test]
    fn a_port_in_use_names_the_option_that_moves_it() {
        let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
        let address = taken.local_addr().expect("addr");
        let message = free(address, "the assign API", "--listen")
            .expect_err("in use")
            .to_string();
        assert!(message.contains("--listen"), "{message}");
    }
}
