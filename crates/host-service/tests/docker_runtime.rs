//! The Docker runtime held to the cases every container runtime must pass (the in-memory fake
//! runs the same ones), on the machine's engine with the reference mandelbox image.

use std::path::Path;

use host_service::runtime::conformance;
use host_service::runtime::docker::DockerRuntime;

#[tokio::test]
async fn behaves_as_every_runtime_must() {
    let image = tokio::task::spawn_blocking(whist_test_support::reference_mandelbox_image)
        .await
        .expect("join")
        .expect("reference mandelbox image");
    let runtime = DockerRuntime::connect(Path::new("/var/run/docker.sock"))
        .await
        .expect("the Docker engine");
    conformance::all(&runtime, &image).await;
}
