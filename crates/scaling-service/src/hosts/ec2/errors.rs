//! The one retry policy for EC2 calls, and the sorting of EC2's errors into [`HostError`] kinds.
//!
//! They live together because they decide together: the kind [`classify`] gives an error is what
//! [`retrying`] looks at to decide whether to call again. Throttling and transport failures are
//! retried here; capacity shortages and refusals go straight back to the caller, which knows
//! better (another type, another zone, or give up).

use std::future::Future;
use std::time::Duration;

use aws_sdk_ec2::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use backon::{ExponentialBuilder, Retryable};

use super::super::HostError;
use super::Ec2Hosts;

/// The delay before the second attempt; doubled for each further one.
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

impl Ec2Hosts {
    /// The one retry policy: `call` runs up to [`super::Ec2Options::call_attempts`] times while
    /// it is throttled or fails in transport.
    pub(super) async fn retrying<T, F, Fut>(&self, what: &str, call: F) -> Result<T, HostError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, HostError>>,
    {
        retrying(self.options.call_attempts, FIRST_BACKOFF, what, call).await
    }
}

/// Runs `call` up to `attempts` times while it fails with throttling or a transport failure,
/// sleeping a jittered, doubling delay from `first` (capped at [`MAX_BACKOFF`]) in between, so
/// that callers that failed together do not retry together. Capacity shortages and refusals
/// are returned at once.
async fn retrying<T, F, Fut>(
    attempts: u32,
    first: Duration,
    what: &str,
    call: F,
) -> Result<T, HostError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, HostError>>,
{
    let policy = ExponentialBuilder::default()
        .with_min_delay(first / 2)
        .with_max_delay(MAX_BACKOFF)
        .with_max_times(attempts.saturating_sub(1) as usize)
        .with_jitter();
    call.retry(policy)
        .sleep(tokio::time::sleep)
        .when(retried_here)
        .notify(|error, delay| tracing::warn!(%error, ?delay, "{what} failed; retrying"))
        .await
}

/// Which kinds this layer retries. Narrower than [`HostError::is_retryable`]: a capacity
/// shortage is worth retrying, but by the caller, elsewhere, not by hammering the same call.
fn retried_here(error: &HostError) -> bool {
    matches!(error, HostError::Throttled(_) | HostError::Failed(_))
}

/// An SDK failure of `operation` as a [`HostError`]: service errors by their code, requests the
/// SDK could not even build as refusals, and everything on the way (timeouts, connections,
/// unreadable answers) as failures.
pub(super) fn sdk_error<E>(operation: &str, error: SdkError<E>) -> HostError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    match &error {
        SdkError::ServiceError(service) => {
            let status = service.raw().status().as_u16();
            let code = service.err().code();
            let message = service.err().message().unwrap_or("no message");
            classify(
                code,
                Some(status),
                format!(
                    "{operation}: {}: {message}",
                    code.unwrap_or("unknown error")
                ),
            )
        }
        SdkError::ConstructionFailure(_) => {
            HostError::Refused(format!("{operation}: {}", DisplayErrorContext(&error)))
        }
        // Timeouts, dispatch (connection) failures, unreadable responses.
        _ => HostError::Failed(format!("{operation}: {}", DisplayErrorContext(&error))),
    }
}

/// Sorts an EC2 error by its code (and, for codes it does not know, the HTTP status).
///
/// Throttling is retried; capacity shortages are worth another type or zone; requests that
/// cannot succeed as sent are refused; server errors and anything unknown are failures, retried.
pub fn classify(code: Option<&str>, status: Option<u16>, detail: String) -> HostError {
    let Some(code) = code else {
        return HostError::Failed(detail);
    };
    const THROTTLED: [&str; 4] = [
        "RequestLimitExceeded",
        "Throttling",
        "ThrottlingException",
        "TooManyRequestsException",
    ];
    const CAPACITY: [&str; 8] = [
        "InsufficientInstanceCapacity",
        "InsufficientHostCapacity",
        "InsufficientReservedInstanceCapacity",
        "InsufficientCapacity",
        "InsufficientFreeAddressesInSubnet",
        "InstanceLimitExceeded",
        "VcpuLimitExceeded",
        // "The requested configuration is currently not supported": this type in this zone.
        "Unsupported",
    ];
    const REFUSED: [&str; 10] = [
        "UnauthorizedOperation",
        "AuthFailure",
        "IdempotentParameterMismatch",
        "OptInRequired",
        "Blocked",
        "PendingVerification",
        "SignatureDoesNotMatch",
        "InvalidClientTokenId",
        "UnsupportedOperation",
        "DryRunOperation",
    ];
    const REFUSED_PREFIXES: [&str; 3] = ["Invalid", "Missing", "UnknownParameter"];
    const FAILED: [&str; 5] = [
        "InternalError",
        "InternalFailure",
        "ServiceUnavailable",
        "Unavailable",
        "RequestExpired",
    ];
    if THROTTLED.contains(&code) {
        HostError::Throttled(detail)
    } else if CAPACITY.contains(&code) {
        HostError::InsufficientCapacity(detail)
    } else if FAILED.contains(&code) {
        HostError::Failed(detail)
    } else if REFUSED.contains(&code)
        || REFUSED_PREFIXES
            .iter()
            .any(|prefix| code.starts_with(prefix))
        || code.ends_with(".NotFound")
        || code.ends_with(".Malformed")
    {
        HostError::Refused(detail)
    } else if status == Some(429) {
        HostError::Throttled(detail)
    } else {
        // Unknown: retried, the conservative reading of a code this table lacks.
        HostError::Failed(detail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classified(code: Option<&str>, status: Option<u16>) -> &'static str {
        classify(code, status, "detail".to_owned()).kind()
    }

    #[test]
    fn throttling_codes_are_throttled() {
        for code in ["RequestLimitExceeded", "Throttling", "ThrottlingException"] {
            assert_eq!(classified(Some(code), Some(503)), "throttled", "{code}");
        }
        assert_eq!(classified(Some("SomethingNew"), Some(429)), "throttled");
    }

    #[test]
    fn capacity_codes_are_insufficient_capacity() {
        for code in [
            "InsufficientInstanceCapacity",
            "InstanceLimitExceeded",
            "InsufficientHostCapacity",
            "Unsupported",
            "VcpuLimitExceeded",
        ] {
            assert_eq!(classified(Some(code), Some(400)), "capacity", "{code}");
        }
    }

    #[test]
    fn requests_that_cannot_succeed_are_refused() {
        for code in [
            "InvalidAMIID.NotFound",
            "InvalidAMIID.Malformed",
            "InvalidParameterValue",
            "InvalidParameterCombination",
            "InvalidInstanceID.NotFound",
            "InvalidInstanceID.Malformed",
            "UnauthorizedOperation",
            "AuthFailure",
            "IdempotentParameterMismatch",
            "MissingParameter",
            "InvalidSubnetID.NotFound",
            "InvalidGroup.NotFound",
            "OptInRequired",
        ] {
            assert_eq!(classified(Some(code), Some(400)), "refused", "{code}");
        }
    }

    #[test]
    fn server_and_transport_failures_are_failed() {
        assert_eq!(classified(None, None), "failed");
        assert_eq!(classified(None, Some(500)), "failed");
        assert_eq!(classified(Some("InternalError"), Some(500)), "failed");
        assert_eq!(classified(Some("Unavailable"), Some(503)), "failed");
        assert_eq!(classified(Some("SomethingNew"), Some(400)), "failed");
    }

    #[test]
    fn retryability_follows_the_classes() {
        assert!(classify(Some("Throttling"), Some(400), String::new()).is_retryable());
        assert!(classify(Some("InsufficientInstanceCapacity"), None, String::new()).is_retryable());
        assert!(!classify(Some("InvalidAMIID.NotFound"), None, String::new()).is_retryable());
        assert!(classify(None, None, String::new()).is_retryable());
    }

    #[test]
    fn detail_is_kept() {
        let error = classify(
            Some("InvalidAMIID.NotFound"),
            Some(400),
            "RunInstances: InvalidAMIID.NotFound: no such image".to_owned(),
        );
        assert!(error.to_string().contains("no such image"), "{error}");
    }

    #[tokio::test]
    async fn retries_stop_at_the_first_unretried_error() {
        let mut calls = 0;
        let result: Result<(), HostError> = retrying(5, Duration::from_millis(1), "Test", || {
            calls += 1;
            let error = if calls < 3 {
                HostError::Throttled("slow down".to_owned())
            } else {
                HostError::Refused("no".to_owned())
            };
            async move { Err(error) }
        })
        .await;
        assert!(matches!(result, Err(HostError::Refused(_))));
        assert_eq!(calls, 3);
    }

    #[tokio::test]
    async fn retries_give_up_after_the_attempts() {
        let mut calls = 0;
        let result: Result<(), HostError> = retrying(5, Duration::from_millis(1), "Test", || {
            calls += 1;
            async { Err(HostError::Failed("down".to_owned())) }
        })
        .await;
        assert!(matches!(result, Err(HostError::Failed(_))));
        assert_eq!(calls, 5);
    }

    #[tokio::test]
    async fn capacity_is_returned_without_retrying() {
        let mut calls = 0;
        let result: Result<(), HostError> = retrying(5, Duration::from_millis(1), "Test", || {
            calls += 1;
            async { Err(HostError::InsufficientCapacity("none".to_owned())) }
        })
        .await;
        assert!(matches!(result, Err(HostError::InsufficientCapacity(_))));
        assert_eq!(calls, 1);
    }
}
