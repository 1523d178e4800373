//! Finding what a request names: an exact name or id, else a unique id prefix (as relayctl's
//! tables show ids), else NOT_FOUND with the closest name ("did you mean").

use tonic::Status;

/// The item named `given` by an id prefix (after the exact name and id found nothing), or
/// NOT_FOUND saying so, with the closest name when one is near ("did you mean").
pub(super) fn lookup<T>(
    items: Vec<T>,
    given: &str,
    what: &str,
    id_and_name: impl Fn(&T) -> (&String, &String),
) -> Result<T, Status> {
    let names: Vec<String> = items.iter().map(|i| id_and_name(i).1.clone()).collect();
    by_id_prefix(items, given, what, id_and_name)?.ok_or_else(|| Status::not_found(not_found(what, given, &names)))
}

/// "account \"mokc\" not found; did you mean \"mock\"?": the closest name, when a typo away
/// (a case difference, or at most two edits for names of five or more characters).
pub(super) fn not_found(what: &str, given: &str, names: &[String]) -> String {
    let g = given.to_lowercase();
    let near = names
        .iter()
        .map(|n| (strsim::damerau_levenshtein(&g, &n.to_lowercase()), n))
        .filter(|(d, n)| *d == 0 || (*d <= 2 && g.chars().count() >= 5 && n.chars().count() >= 5) || *d <= 1)
        .min_by_key(|(d, _)| *d);
    match near {
        Some((_, n)) => format!("{what} {given:?} not found; did you mean {n:?}?"),
        None => format!("{what} {given:?} not found"),
    }
}

/// Fewest characters of an id taken as that id (after the exact name and id found nothing).
const MIN_ID_PREFIX: usize = 4;

/// The one item whose id starts with `prefix`, as relayctl's tables show ids (like git's short
/// hashes). Only a name or an exact id is looked up before this, so a name always wins. `None`
/// when it is no id prefix or nothing matches; an error naming the candidates when several do.
pub(super) fn by_id_prefix<T>(
    items: Vec<T>,
    prefix: &str,
    what: &str,
    id_and_name: impl Fn(&T) -> (&String, &String),
) -> Result<Option<T>, Status> {
    let p = prefix.to_ascii_lowercase();
    if p.len() < MIN_ID_PREFIX || !p.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-') {
        return Ok(None);
    }
    let mut matches: Vec<T> = items
        .into_iter()
        .filter(|i| id_and_name(i).0.to_ascii_lowercase().starts_with(&p))
        .collect();
    match matches.len() {
        0 => Ok(None),
        1 => Ok(matches.pop()),
        n => {
            let names: Vec<&String> = matches.iter().map(|i| id_and_name(i).1).collect();
            Err(Status::invalid_argument(format!(
                "{prefix:?} is the start of the ids of {n} {what}s ({}): give more of the id, or the name",
                names.iter().map(|n| n.as_str()).collect::<Vec<_>>().join(", ")
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::admin::validate::{validate_name, validate_weight, MAX_WEIGHT};

    /// Ids are taken by a prefix, as relayctl's tables show them; several matches are refused
    /// with their names; too short or not hex is no prefix.
    #[test]
    #[allow(clippy::unwrap_used)]
    fn ids_are_taken_by_a_unique_prefix() {
        let items = || {
            vec![
                ("01a240bb-3e84-7348-8e4d-8fdee19ae7ed".to_string(), "mock".to_string()),
                ("01a240bb-3e95-7021-b19b-4e9f2e185be9".to_string(), "mock2".to_string()),
            ]
        };
        fn f(i: &(String, String)) -> (&String, &String) {
            (&i.0, &i.1)
        }
        let one = by_id_prefix(items(), "01a240bb-3e9", "account", f).unwrap();
        assert_eq!(one.map(|i| i.1), Some("mock2".to_string()));
        assert_eq!(
            by_id_prefix(items(), "01A240BB-3E84", "account", f)
                .unwrap()
                .map(|i| i.1),
            Some("mock".to_string())
        );
        let err = by_id_prefix(items(), "01a240bb", "account", f).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(
            err.message().contains("2 accounts (mock, mock2)") && err.message().contains("give more of the id"),
            "{}",
            err.message()
        );
        assert!(
            by_id_prefix(items(), "01a", "account", f).unwrap().is_none(),
            "too short"
        );
        assert!(
            by_id_prefix(items(), "mock", "account", f).unwrap().is_none(),
            "not hex"
        );
        assert!(by_id_prefix(items(), "ffff", "account", f).unwrap().is_none());
        assert!(validate_weight(MAX_WEIGHT + 1).is_err());
        // A name shaped like an id prefix would shadow an id: refused; words of hex letters not.
        assert!(validate_name("account", "01a2414c-9e06").is_err());
        assert!(validate_name("account", "01a2414c").is_err());
        for ok in ["cafe", "team-1", "acc-1", "1234", "deadbeef"] {
            assert!(validate_name("account", ok).is_ok(), "{ok}");
        }
        // A typo gets the closest name.
        let names: Vec<String> = ["mock", "team-alpha", "MOCK2"].iter().map(|s| s.to_string()).collect();
        assert!(not_found("account", "mokc", &names).ends_with("did you mean \"mock\"?"));
        assert!(not_found("account", "team-alhpa", &names).ends_with("did you mean \"team-alpha\"?"));
        assert!(not_found("account", "mock2", &names).ends_with("did you mean \"MOCK2\"?"));
        assert_eq!(not_found("account", "zzz", &names), "account \"zzz\" not found");
    }
}
