//! Typed identifiers, parsed once at the edge.
//!
//! Every id that reaches the domain went through [`parse_id`]: 1 to 64
//! characters, no whitespace, no control or invisible formatting characters
//! (rule R10). Keeping the check in one constructor means the database, Redis
//! keys and log lines never see a hostile id.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Longest id accepted, in characters (the `VARCHAR(64)` of the legacy table).
pub const MAX_ID_CHARS: usize = 64;

/// Longest `event_id` accepted, in characters. Producers choose these (UUIDs,
/// `service-counter`), so they get more room than lifecycle ids.
pub const MAX_EVENT_ID_CHARS: usize = 128;

/// Event ids beginning with this are written by `import-legacy` only
/// (`legacy:{live|demo}:{order}:{column}:{digest}`): the import relies on
/// them being its own (a re-import recognises what it wrote), so an event
/// on a topic with such an id is refused.
pub const IMPORT_EVENT_ID_PREFIX: &str = "legacy:";

/// Why a string is not a valid id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("is empty")]
    Empty,
    #[error("is {chars} characters long; at most {max} are allowed")]
    TooLong { chars: usize, max: usize },
    #[error("contains whitespace at character {position}")]
    Whitespace { position: usize },
    #[error("contains a control or invisible character (U+{code:04X}) at character {position}")]
    NotPrintable { position: usize, code: u32 },
}

/// Checks the shared id rules and returns the string unchanged when it passes.
fn parse_id(raw: &str, max: usize) -> Result<Arc<str>, IdError> {
    if raw.is_empty() {
        return Err(IdError::Empty);
    }
    let chars = raw.chars().count();
    if chars > max {
        return Err(IdError::TooLong { chars, max });
    }
    for (position, c) in raw.chars().enumerate() {
        if c.is_whitespace() {
            return Err(IdError::Whitespace { position });
        }
        if c.is_control() || is_invisible_format(c) {
            return Err(IdError::NotPrintable {
                position,
                code: c as u32,
            });
        }
    }
    Ok(Arc::from(raw))
}

/// Characters that render as nothing, or reorder or restyle what is
/// around them: an id holding one would look identical to another id in
/// every log and UI. Soft hyphen; Arabic letter mark; Mongolian vowel
/// separator; zero-width spaces and joiners, direction marks, embeddings,
/// overrides and isolates; word joiner and invisible operators; variation
/// selectors; the byte-order mark; Hangul fillers (they render as blank);
/// Unicode tags.
fn is_invisible_format(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{061C}'
            | '\u{115F}'
            | '\u{1160}'
            | '\u{180E}'
            | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{2069}'
            | '\u{3164}'
            | '\u{FE00}'..='\u{FE0F}'
            | '\u{FEFF}'
            | '\u{FFA0}'
            | '\u{E0000}'..='\u{E007F}'
            | '\u{E0100}'..='\u{E01EF}'
    )
}

/// An id type over a validated string. Shared (`Arc<str>`), not owned: an
/// id is copied into many places (the book's index, every row and entry of
/// a batch, the orders kept between batches), and a copy is then a count,
/// not an allocation (cloning ids was a tenth of the service's CPU in a
/// drain, 2026-11-29).
macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident, $max:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(Arc<str>);

        impl $name {
            /// Parses and validates an id.
            ///
            /// # Errors
            /// [`IdError`] when the string is empty, too long, or holds
            /// whitespace or invisible characters.
            pub fn parse(raw: &str) -> Result<Self, IdError> {
                parse_id(raw, $max).map(Self)
            }

            /// The id as it was given.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(raw: String) -> Result<Self, IdError> {
                Self::parse(&raw)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0.as_ref().to_owned()
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

string_id!(
    /// The canonical id of an order, chosen by the order service.
    OrderId,
    MAX_ID_CHARS
);
string_id!(
    /// Any id an order carried in a request to the liquidity provider,
    /// including the order's own `order_id`.
    LifecycleId,
    MAX_ID_CHARS
);
string_id!(
    /// The owner of an order, as the order service names users.
    UserId,
    MAX_ID_CHARS
);
string_id!(
    /// The producer-chosen idempotency key of one input event (rule R9).
    EventId,
    MAX_EVENT_ID_CHARS
);

impl OrderId {
    /// The order's own id seen as a lifecycle id (type `order_id`): both obey
    /// the same rules, so this cannot fail.
    pub fn as_lifecycle_id(&self) -> LifecycleId {
        LifecycleId(self.0.clone())
    }
}

/// The eight kinds of lifecycle id, spelled as in the legacy table and Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdType {
    OrderId,
    StoplossId,
    TakeprofitId,
    StoplossCancelId,
    TakeprofitCancelId,
    CloseId,
    CancelId,
    ModifyId,
}

impl IdType {
    /// All eight, in the order of the legacy `ENUM`.
    pub const ALL: [IdType; 8] = [
        IdType::OrderId,
        IdType::StoplossId,
        IdType::TakeprofitId,
        IdType::StoplossCancelId,
        IdType::TakeprofitCancelId,
        IdType::CloseId,
        IdType::CancelId,
        IdType::ModifyId,
    ];

    /// The spelling used in the database, Redis and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            IdType::OrderId => "order_id",
            IdType::StoplossId => "stoploss_id",
            IdType::TakeprofitId => "takeprofit_id",
            IdType::StoplossCancelId => "stoploss_cancel_id",
            IdType::TakeprofitCancelId => "takeprofit_cancel_id",
            IdType::CloseId => "close_id",
            IdType::CancelId => "cancel_id",
            IdType::ModifyId => "modify_id",
        }
    }

    /// Parses the database spelling.
    pub fn parse(raw: &str) -> Option<IdType> {
        IdType::ALL.into_iter().find(|t| t.as_str() == raw)
    }

    /// Cancel-type ids (`*_cancel_id`, `cancel_id`) confirm a cancellation of
    /// another id: a provider `CANCELLED` for them means the cancel went
    /// through (rule R6).
    pub fn is_cancel(self) -> bool {
        matches!(
            self,
            IdType::StoplossCancelId | IdType::TakeprofitCancelId | IdType::CancelId
        )
    }
}

impl fmt::Display for IdType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The status of one lifecycle id: the legacy four plus `rejected`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdStatus {
    Active,
    Replaced,
    Cancelled,
    Executed,
    /// The provider refused the request. An extension of the legacy enum.
    Rejected,
}

impl IdStatus {
    /// All five, in the order of the database `ENUM`.
    pub const ALL: [IdStatus; 5] = [
        IdStatus::Active,
        IdStatus::Replaced,
        IdStatus::Cancelled,
        IdStatus::Executed,
        IdStatus::Rejected,
    ];

    /// The spelling used in the database and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            IdStatus::Active => "active",
            IdStatus::Replaced => "replaced",
            IdStatus::Cancelled => "cancelled",
            IdStatus::Executed => "executed",
            IdStatus::Rejected => "rejected",
        }
    }

    /// Parses the database spelling.
    pub fn parse(raw: &str) -> Option<IdStatus> {
        IdStatus::ALL.into_iter().find(|s| s.as_str() == raw)
    }

    /// `executed`, `cancelled` and `rejected` never change again (rule R6).
    /// `replaced` is not final: the provider may still execute a replaced
    /// stop-loss that triggered before the replacement reached it.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            IdStatus::Executed | IdStatus::Cancelled | IdStatus::Rejected
        )
    }
}

impl fmt::Display for IdStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_and_unicode_ids() {
        for ok in ["123456789", "SL111", "a", "ордер-1", &"x".repeat(64)] {
            assert_eq!(LifecycleId::parse(ok).unwrap().as_str(), ok);
        }
    }

    #[test]
    fn rejects_bad_ids_with_a_reason() {
        assert_eq!(LifecycleId::parse(""), Err(IdError::Empty));
        assert_eq!(
            LifecycleId::parse(&"x".repeat(80)),
            Err(IdError::TooLong { chars: 80, max: 64 })
        );
        assert_eq!(
            LifecycleId::parse("SL 1"),
            Err(IdError::Whitespace { position: 2 })
        );
        assert_eq!(
            LifecycleId::parse("SL\u{0}1"),
            Err(IdError::NotPrintable {
                position: 2,
                code: 0
            })
        );
        assert!(matches!(
            LifecycleId::parse("SL\u{200B}"),
            Err(IdError::NotPrintable { .. })
        ));
    }

    #[test]
    fn rejects_every_invisible_or_reordering_character() {
        for c in [
            '\u{061C}',
            '\u{115F}',
            '\u{1160}',
            '\u{180E}',
            '\u{2066}',
            '\u{2067}',
            '\u{2068}',
            '\u{2069}',
            '\u{3164}',
            '\u{FE00}',
            '\u{FE0F}',
            '\u{FFA0}',
            '\u{E0001}',
            '\u{E0041}',
            '\u{E007F}',
            '\u{E0100}',
        ] {
            let id = format!("SL{c}1");
            assert_eq!(
                LifecycleId::parse(&id),
                Err(IdError::NotPrintable {
                    position: 2,
                    code: c as u32
                }),
                "U+{:04X}",
                c as u32
            );
        }
        // Visible letters and symbols beside them stay accepted.
        for ok in ["SL-1", "ㅎ1", "注文1", "SL✓"] {
            assert!(LifecycleId::parse(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn event_ids_allow_more_room() {
        assert!(EventId::parse(&"e".repeat(128)).is_ok());
        assert!(EventId::parse(&"e".repeat(129)).is_err());
    }

    #[test]
    fn type_and_status_spellings_round_trip() {
        for t in IdType::ALL {
            assert_eq!(IdType::parse(t.as_str()), Some(t));
        }
        for s in IdStatus::ALL {
            assert_eq!(IdStatus::parse(s.as_str()), Some(s));
        }
    }
}
