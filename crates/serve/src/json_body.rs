//! Request bodies that must be one JSON object. serde builds a struct from a JSON array too
//! (field by field, in order), so `[]` would pass as an empty request and `["id", "{}"]` as
//! a full one; both services answer those 400 instead.

use serde::de::DeserializeOwned;

/// `body` as `T`, if it is a JSON object that fits `T`; otherwise what is wrong with it.
pub fn json_object<T: DeserializeOwned>(body: &[u8]) -> Result<T, String> {
    match body.iter().find(|byte| !byte.is_ascii_whitespace()) {
        Some(b'{') => serde_json::from_slice(body).map_err(|error| error.to_string()),
        _ => Err("the body must be a JSON object".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize, PartialEq)]
    struct Request {
        id: String,
        #[serde(default)]
        data: Option<String>,
    }

    #[test]
    fn only_an_object_that_fits_is_taken() {
        let parsed: Request = json_object(b" \n{\"id\": \"a\"}").expect("an object");
        assert_eq!(parsed.id, "a");
        for bad in [
            &b"[\"a\", \"b\"]"[..],
            b"[]",
            b"\"a\"",
            b"7",
            b"",
            b"  ",
            b"{\"data\": 1}",
        ] {
            assert!(
                json_object::<Request>(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let error = json_object::<Request>(b"[\"a\"]").expect_err("an array");
        assert!(error.contains("JSON object"), "{error}");
    }
}
