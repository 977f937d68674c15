//! `amqp.url` as a list: the nodes of one cluster, separated by commas
//! (contract §2, §5).

use lapin::uri::AMQPUri;

use super::ConfigError;

/// The URLs of `amqp.url`, in the order given, trimmed. A password that
/// contains a comma must be percent-encoded (`%2C`).
pub fn broker_urls(list: &str) -> impl Iterator<Item = &str> {
    list.split(',').map(str::trim)
}

/// Checks that every entry of `amqp.url` is an AMQP URL. Messages name
/// entries by position, never by content: the URL parser quotes its input.
pub(super) fn validate_urls(list: &str) -> Result<(), ConfigError> {
    let count = broker_urls(list).count();
    for (i, url) in broker_urls(list).enumerate() {
        let position = if count > 1 {
            format!("entry {} of {count} ", i + 1)
        } else {
            String::new()
        };
        if url.is_empty() {
            return Err(ConfigError::invalid(
                "amqp.url",
                format!("{position}is empty (separate the nodes' URLs with single commas)"),
            ));
        }
        if let Err(e) = url.parse::<AMQPUri>() {
            // The entry is not shown: where its password is cannot be
            // known once it does not parse, and the index names it.
            return Err(ConfigError::invalid(
                "amqp.url",
                format!(
                    "{position}is not an AMQP URL: {}",
                    e.replace(url, "<the entry>")
                ),
            ));
        }
    }
    Ok(())
}

/// The password of `scheme://user:password@host…` as written (maybe
/// percent-encoded), if there is one.
pub fn url_password(url: &str) -> Option<&str> {
    let rest = &url[url.find("://")? + 3..];
    let authority = &rest[..rest.find('/').unwrap_or(rest.len())];
    let userinfo = &authority[..authority.rfind('@')?];
    let password = &userinfo[userinfo.find(':')? + 1..];
    (!password.is_empty()).then_some(password)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_are_split_and_trimmed() {
        let urls: Vec<_> = broker_urls("amqp://a:1@h1/%2f, amqp://b:2@h2/%2f").collect();
        assert_eq!(urls, ["amqp://a:1@h1/%2f", "amqp://b:2@h2/%2f"]);
        assert_eq!(broker_urls("amqp://h/%2f").count(), 1);
    }

    #[test]
    fn bad_entries_are_named_without_their_password() {
        let e = validate_urls("amqp://u:pw1@h1/%2f,,amqp://u:pw3@h3/%2f")
            .expect_err("empty entry")
            .to_string();
        assert!(e.contains("amqp.url") && e.contains("entry 2 of 3"), "{e}");
        let e = validate_urls("amqp://u:pw1@h1/%2f,amqp://u:s3cr3t@h2:notaport/%2f")
            .expect_err("bad port")
            .to_string();
        assert!(e.contains("entry 2 of 2") && !e.contains("s3cr3t"), "{e}");
        let e = validate_urls("http://u:s3cr3t@h2/x")
            .expect_err("scheme")
            .to_string();
        assert!(e.contains("amqp.url") && !e.contains("s3cr3t"), "{e}");
        assert!(validate_urls("amqp://u:p@h1/%2f,amqps://u:q@h2:5671/v").is_ok());
    }

    #[test]
    fn passwords_are_found_as_written() {
        assert_eq!(url_password("amqp://u:p%40ss@h/%2f"), Some("p%40ss"));
        assert_eq!(url_password("redis://:pw@h:6379/0"), Some("pw"));
        assert_eq!(url_password("amqp://u@h/%2f"), None);
        assert_eq!(url_password("amqp://h/%2f"), None);
        assert_eq!(url_password("not a url"), None);
    }
}
