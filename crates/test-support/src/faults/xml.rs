//! Just enough reading of EC2's XML answers to take instances out of a DescribeInstances.

use std::ops::Range;

/// One element of an XML document, as byte ranges into it.
#[derive(Debug, Clone)]
struct Element {
    name: String,
    /// From its `<` to just after its closing `>`.
    outer: Range<usize>,
    /// Its content (empty for `<name/>`).
    inner: Range<usize>,
}

/// The direct child elements within `range` of `xml`, skipping the prolog, comments, CDATA
/// sections and text. This is just enough XML for EC2's responses (no entities need resolving
/// to find an instance id), not a general parser; it fails on unbalanced tags rather than
/// guessing.
fn child_elements(xml: &str, range: Range<usize>) -> Result<Vec<Element>, String> {
    let bytes = xml.as_bytes();
    let end = range.end;
    let mut children = Vec::new();
    // The open elements below `range`: their names, and where the outermost one started.
    let mut open: Vec<&str> = Vec::new();
    let mut outer_start = 0;
    let mut inner_start = 0;
    let mut pos = range.start;
    let skip_to = |from: usize, terminator: &str| -> Result<usize, String> {
        xml[from..end]
            .find(terminator)
            .map(|at| from + at + terminator.len())
            .ok_or_else(|| format!("no {terminator:?} after byte {from}"))
    };
    while let Some(at) = xml[pos..end].find('<') {
        let tag = pos + at;
        let rest = &xml[tag..end];
        if rest.starts_with("<?") {
            pos = skip_to(tag, "?>")?;
        } else if rest.starts_with("<!--") {
            pos = skip_to(tag, "-->")?;
        } else if rest.starts_with("<![CDATA[") {
            pos = skip_to(tag, "]]>")?;
        } else if rest.starts_with("<!") {
            pos = skip_to(tag, ">")?;
        } else if let Some(closing) = rest.strip_prefix("</") {
            let close = skip_to(tag, ">")?;
            let name = closing[..close - tag - 3].trim_end();
            match open.pop() {
                Some(expected) if expected == name => {}
                expected => {
                    return Err(format!("</{name}> at byte {tag} closes {expected:?}"));
                }
            }
            if open.is_empty() {
                children.push(Element {
                    name: name.to_owned(),
                    outer: outer_start..close,
                    inner: inner_start..tag,
                });
            }
            pos = close;
        } else {
            // A start tag; `>` inside a quoted attribute value does not end it.
            let mut quote = None;
            let mut close = None;
            for (offset, &byte) in bytes[tag + 1..end].iter().enumerate() {
                match (quote, byte) {
                    (None, b'"' | b'\'') => quote = Some(byte),
                    (Some(q), _) if q == byte => quote = None,
                    (None, b'>') => {
                        close = Some(tag + 1 + offset + 1);
                        break;
                    }
                    _ => {}
                }
            }
            let close = close.ok_or_else(|| format!("unterminated tag at byte {tag}"))?;
            let self_closing = bytes[close - 2] == b'/';
            let name_end = xml[tag + 1..close]
                .find(|c: char| c.is_ascii_whitespace() || c == '/' || c == '>')
                .map_or(close, |at| tag + 1 + at);
            let name = &xml[tag + 1..name_end];
            if name.is_empty() {
                return Err(format!("a tag without a name at byte {tag}"));
            }
            if open.is_empty() {
                outer_start = tag;
                inner_start = close;
            }
            if self_closing {
                if open.is_empty() {
                    children.push(Element {
                        name: name.to_owned(),
                        outer: tag..close,
                        inner: close..close,
                    });
                }
            } else {
                open.push(name);
            }
            pos = close;
        }
    }
    if let Some(name) = open.last() {
        return Err(format!("<{name}> is never closed"));
    }
    Ok(children)
}

/// The first direct child of `parent` called `name`.
fn child(xml: &str, parent: &Element, name: &str) -> Result<Option<Element>, String> {
    Ok(child_elements(xml, parent.inner.clone())?
        .into_iter()
        .find(|element| element.name == name))
}

/// `xml` (a DescribeInstancesResponse) without the instances whose `<instanceId>` is in
/// `hidden`, and without any reservation left empty by that. The layout moto writes:
///
/// ```text
/// DescribeInstancesResponse > reservationSet > item (a reservation)
///     > reservationId, ownerId, groupSet, instancesSet > item (an instance) > instanceId, ...
/// ```
///
/// An instance `item` holds nested `item`s of its own (block devices, network interfaces,
/// security groups, tags), and moto writes `instanceId` after some of them, so only a direct
/// child `instanceId` of a direct child `item` of `instancesSet` identifies the instance.
pub(super) fn hide_instances(xml: &str, hidden: &[String]) -> Result<String, String> {
    let root = child_elements(xml, 0..xml.len())?
        .into_iter()
        .next()
        .ok_or("no root element")?;
    if root.name != "DescribeInstancesResponse" {
        return Err(format!("the root element is <{}>", root.name));
    }
    let reservations = child(xml, &root, "reservationSet")?.ok_or("no <reservationSet>")?;
    let mut cuts: Vec<Range<usize>> = Vec::new();
    for reservation in child_elements(xml, reservations.inner)? {
        if reservation.name != "item" {
            continue;
        }
        let Some(instances) = child(xml, &reservation, "instancesSet")? else {
            continue;
        };
        let items: Vec<Element> = child_elements(xml, instances.inner)?
            .into_iter()
            .filter(|element| element.name == "item")
            .collect();
        let mut removed = Vec::new();
        for item in &items {
            let id = child(xml, item, "instanceId")?.ok_or_else(|| {
                format!(
                    "an instance item at byte {} has no <instanceId>",
                    item.outer.start
                )
            })?;
            let id = xml[id.inner].trim();
            if hidden.iter().any(|hidden| hidden == id) {
                removed.push(item.outer.clone());
            }
        }
        if !removed.is_empty() && removed.len() == items.len() {
            cuts.push(reservation.outer);
        } else {
            cuts.extend(removed);
        }
    }
    // The cuts are in document order and do not overlap: one per reservation, or its items.
    let mut out = String::with_capacity(xml.len());
    let mut kept_from = 0;
    for cut in cuts {
        out.push_str(&xml[kept_from..cut.start]);
        kept_from = cut.end;
    }
    out.push_str(&xml[kept_from..]);
    Ok(out)
}

#[cfg(test)]
/// The text of every `<name>` in `xml` (at any depth), in document order.
pub(super) fn texts(xml: &str, name: &str) -> Vec<String> {
    let open = format!("<{name}>");
    let close = format!("</{name}>");
    xml.match_indices(&open)
        .map(|(at, _)| {
            let start = at + open.len();
            let end = start + xml[start..].find(&close).expect("closed");
            xml[start..end].to_owned()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// moto's layout, trimmed: nested `item`s in an instance before its `instanceId`, and a
    /// reservation of two instances next to one of one.
    const DESCRIBE: &str = "<?xml version=\"1.0\" encoding=\"utf-8\"?>\n\
        <DescribeInstancesResponse xmlns=\"http://ec2.amazonaws.com/doc/2016-11-15\">\
        <reservationSet>\
        <item><reservationId>r-a</reservationId><groupSet/><instancesSet>\
        <item><blockDeviceMapping><item><deviceName>/dev/sda1</deviceName></item></blockDeviceMapping>\
        <groupSet><item><groupId>sg-1</groupId></item></groupSet><instanceId>i-a1</instanceId></item>\
        <item><tagSet><item><key>k</key><value>i-b1</value></item></tagSet><instanceId>i-a2</instanceId></item>\
        </instancesSet></item>\
        <item><reservationId>r-b</reservationId><instancesSet>\
        <item><stateReason><code/><message/></stateReason><instanceId> i-b1 </instanceId></item>\
        </instancesSet></item>\
        </reservationSet><requestId>request-id</requestId></DescribeInstancesResponse>";

    #[test]
    fn fault_hide_instances_edits_moto_shaped_xml() {
        let hide = |ids: &[&str]| {
            let ids: Vec<String> = ids.iter().map(|id| (*id).to_owned()).collect();
            hide_instances(DESCRIBE, &ids).expect("filtered")
        };
        assert_eq!(hide(&[]), DESCRIBE);
        assert_eq!(hide(&["i-zzz"]), DESCRIBE);

        // One of two: the reservation stays with the other.
        let one = hide(&["i-a2"]);
        assert_eq!(texts(&one, "instanceId"), ["i-a1", " i-b1 "]);
        assert_eq!(texts(&one, "reservationId"), ["r-a", "r-b"]);
        assert!(!one.contains("<key>k</key>"), "the whole item went");

        // The only one (the id is matched trimmed, and not by the tag value that equals it):
        // the reservation goes.
        let only = hide(&["i-b1"]);
        assert_eq!(texts(&only, "instanceId"), ["i-a1", "i-a2"]);
        assert_eq!(texts(&only, "reservationId"), ["r-a"]);

        let all = hide(&["i-a1", "i-a2", "i-b1"]);
        assert!(
            all.ends_with(
                "<reservationSet></reservationSet><requestId>request-id</requestId>\
                 </DescribeInstancesResponse>"
            ),
            "{all}"
        );
        // Still well formed.
        let root = child_elements(&all, 0..all.len()).expect("parses");
        assert_eq!(root.len(), 1);
        assert_eq!(root[0].name, "DescribeInstancesResponse");

        // What the filter cannot read is an error, not a silent pass.
        let ids = ["i-a1".to_owned()];
        assert!(hide_instances("<Response><Errors/></Response>", &ids).is_err());
        assert!(hide_instances("<DescribeInstancesResponse><reservationSet>", &ids).is_err());
        assert!(
            hide_instances(
                "<DescribeInstancesResponse><reservationSet><item><instancesSet><item><x/></item>\
                 </instancesSet></item></reservationSet></DescribeInstancesResponse>",
                &ids
            )
            .is_err()
        );
        assert!(hide_instances("<a><b></a></b>", &ids).is_err());
    }
}
