//! Who this host is: from EC2's instance metadata service (IMDSv2), or from configuration in
//! local mode.
//!
//! IMDSv2 first asks for a session token with a `PUT` and then sends it with every read. Every
//! field is required except the `Name` tag (instance tags in metadata may be switched off); a
//! missing one is an error that names it, never a silently empty value.

use std::net::IpAddr;
use std::time::Duration;

use url::Url;

/// The facts registration checks against the instance row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostIdentity {
    pub instance_id: String,
    pub instance_type: String,
    pub image_id: String,
    pub region: String,
    pub public_ip: IpAddr,
    pub name: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    #[error("instance metadata service at {endpoint} unreachable")]
    Unreachable {
        endpoint: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("instance metadata service refused a session token (HTTP {status})")]
    TokenRefused { status: u16 },
    #[error("instance metadata field {field} unavailable (HTTP {status})")]
    FieldUnavailable { field: &'static str, status: u16 },
    #[error("instance metadata field {field} is not valid: {value:?}")]
    FieldInvalid { field: &'static str, value: String },
}

const TOKEN_PATH: &str = "latest/api/token";
const TOKEN_TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";
const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";
/// Six hours, the longest IMDS allows; the token is used only during startup anyway.
const TOKEN_TTL_SECONDS: &str = "21600";

/// Reads this instance's identity from the metadata service at `endpoint`.
pub async fn from_imds(endpoint: &Url) -> Result<HostIdentity, MetadataError> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        // The metadata service is link-local: a proxy from the environment must never see it.
        .no_proxy()
        .build()
        .expect("a client with only a timeout always builds");
    let imds = Imds::connect(client, endpoint.clone()).await?;
    let public_ip_text = imds
        .field("public-ipv4", "latest/meta-data/public-ipv4")
        .await?;
    let public_ip = public_ip_text
        .trim()
        .parse()
        .map_err(|_| MetadataError::FieldInvalid {
            field: "public-ipv4",
            value: public_ip_text.clone(),
        })?;
    Ok(HostIdentity {
        instance_id: imds
            .field("instance-id", "latest/meta-data/instance-id")
            .await?,
        instance_type: imds
            .field("instance-type", "latest/meta-data/instance-type")
            .await?,
        image_id: imds.field("ami-id", "latest/meta-data/ami-id").await?,
        region: imds
            .field("placement/region", "latest/meta-data/placement/region")
            .await?,
        public_ip,
        name: imds
            .optional_field("tags/instance/Name", "latest/meta-data/tags/instance/Name")
            .await?,
    })
}

struct Imds {
    client: reqwest::Client,
    endpoint: Url,
    token: String,
}

impl Imds {
    async fn connect(client: reqwest::Client, endpoint: Url) -> Result<Self, MetadataError> {
        let url = join(&endpoint, TOKEN_PATH);
        let response = client
            .put(url)
            .header(TOKEN_TTL_HEADER, TOKEN_TTL_SECONDS)
            .send()
            .await
            .map_err(|source| MetadataError::Unreachable {
                endpoint: endpoint.to_string(),
                source,
            })?;
        if !response.status().is_success() {
            return Err(MetadataError::TokenRefused {
                status: response.status().as_u16(),
            });
        }
        let token = response
            .text()
            .await
            .map_err(|source| MetadataError::Unreachable {
                endpoint: endpoint.to_string(),
                source,
            })?;
        Ok(Self {
            client,
            endpoint,
            token,
        })
    }

    async fn field(&self, field: &'static str, path: &str) -> Result<String, MetadataError> {
        self.optional_field(field, path)
            .await?
            .ok_or(MetadataError::FieldUnavailable { field, status: 404 })
    }

    /// `None` for 404, the metadata service's answer for a field that does not apply.
    async fn optional_field(
        &self,
        field: &'static str,
        path: &str,
    ) -> Result<Option<String>, MetadataError> {
        let response = self
            .client
            .get(join(&self.endpoint, path))
            .header(TOKEN_HEADER, &self.token)
            .send()
            .await
            .map_err(|source| MetadataError::Unreachable {
                endpoint: self.endpoint.to_string(),
                source,
            })?;
        let status = response.status().as_u16();
        if status == 404 {
            return Ok(None);
        }
        if !response.status().is_success() {
            return Err(MetadataError::FieldUnavailable { field, status });
        }
        let value = response
            .text()
            .await
            .map_err(|source| MetadataError::Unreachable {
                endpoint: self.endpoint.to_string(),
                source,
            })?;
        let value = value.trim().to_owned();
        if value.is_empty() {
            return Err(MetadataError::FieldInvalid { field, value });
        }
        Ok(Some(value))
    }
}

fn join(endpoint: &Url, path: &str) -> Url {
    let mut base = endpoint.clone();
    if !base.path().ends_with('/') {
        base.set_path(&format!("{}/", base.path()));
    }
    base.join(path)
        .expect("metadata paths are valid relative URLs")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_join_under_the_endpoint_with_or_without_a_slash() {
        let with: Url = "http://127.0.0.1:9/".parse().expect("url");
        let without: Url = "http://127.0.0.1:9".parse().expect("url");
        let prefixed: Url = "http://127.0.0.1:9/imds".parse().expect("url");
        assert_eq!(
            join(&with, TOKEN_PATH).as_str(),
            "http://127.0.0.1:9/latest/api/token"
        );
        assert_eq!(
            join(&without, TOKEN_PATH).as_str(),
            "http://127.0.0.1:9/latest/api/token"
        );
        assert_eq!(
            join(&prefixed, TOKEN_PATH).as_str(),
            "http://127.0.0.1:9/imds/latest/api/token"
        );
    }
}
