//! Operations on `whist.images`.

use serde_json::json;
use whist_types::Image;

use super::image_fields;
use crate::Operation;
use crate::operation::{affected_rows, field};

const IMAGES: &str = concat!(
    "query Images { whist_images(order_by: [{provider: asc}, {region: asc}]) { ",
    image_fields!(),
    " } }"
);

/// The active image of every provider and region.
pub fn images() -> Operation<Vec<Image>> {
    Operation::new("Images", IMAGES, json!({}), field("whist_images"))
}

const IMAGE: &str = concat!(
    "query Image($provider: String!, $region: String!) { whist_images_by_pk(provider: $provider, region: $region) { ",
    image_fields!(),
    " } }"
);

/// The active image of one provider and region.
pub fn image(provider: &str, region: &str) -> Operation<Option<Image>> {
    Operation::new(
        "Image",
        IMAGE,
        json!({ "provider": provider, "region": region }),
        field("whist_images_by_pk"),
    )
}

const SET_IMAGE: &str = concat!(
    "mutation SetImage($provider: String!, $region: String!, $image_id: String!, $client_sha: String!) { ",
    "delete_whist_images(where: {provider: {_eq: $provider}, region: {_eq: $region}}) { affected_rows } ",
    "insert_whist_images(objects: [{provider: $provider, region: $region, image_id: $image_id, client_sha: $client_sha}]) { affected_rows } }"
);

/// Makes `image_id` the active image of a region, replacing any previous one in one
/// transaction (a replace rather than an upsert, so it needs no engine-specific conflict clause).
pub fn set_image(provider: &str, region: &str, image_id: &str, client_sha: &str) -> Operation<()> {
    let decode = affected_rows("insert_whist_images");
    Operation::new(
        "SetImage",
        SET_IMAGE,
        json!({ "provider": provider, "region": region, "image_id": image_id, "client_sha": client_sha }),
        move |data| match decode(data)? {
            1 => Ok(()),
            n => Err(format!("expected one image row written, got {n}")),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::assert_well_formed;

    #[test]
    fn every_document_is_well_formed() {
        assert_well_formed(&images());
        assert_well_formed(&image("AWS", "us-east-1"));
        assert_well_formed(&set_image("AWS", "us-east-1", "ami-1", "abc"));
    }

    #[test]
    fn set_image_replaces_in_one_request() {
        let operation = set_image("AWS", "us-east-1", "ami-1", "abc");
        let document = operation.document();
        let delete = document.find("delete_whist_images").expect("delete");
        let insert = document.find("insert_whist_images").expect("insert");
        assert!(delete < insert, "the old row goes first");
    }
}
