//! Input errors: every one names the JSON path of the value that is wrong.

use serde::de::DeserializeOwned;

/// A value that is present but out of range or inconsistent (`422 invalid_field`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// JSON path of the offending value, e.g. `fences[3].radius_m`.
    pub field: String,
    /// A human sentence saying what is wrong.
    pub message: String,
}

impl FieldError {
    /// A field error at `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { field: field.into(), message: message.into() }
    }

    /// The same error with `prefix` put in front of its path (`pings[3]` + `lat` → `pings[3].lat`).
    pub fn within(mut self, prefix: &str) -> Self {
        self.field = join_path(prefix, &self.field);
        self
    }
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Why a request body could not become a domain value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InputError {
    /// Not JSON, or not the expected shape (a string where a number belongs): `400 malformed_json`.
    Malformed {
        /// What the parser said.
        message: String,
        /// Where, when known.
        field: Option<String>,
    },
    /// A value out of range or inconsistent: `422 invalid_field`.
    Invalid(FieldError),
}

impl From<FieldError> for InputError {
    fn from(e: FieldError) -> Self {
        Self::Invalid(e)
    }
}

impl InputError {
    /// The same error with `prefix` put in front of its path.
    pub fn within(self, prefix: &str) -> Self {
        match self {
            Self::Malformed { message, field } => {
                Self::Malformed { message, field: Some(join_path(prefix, field.as_deref().unwrap_or(""))) }
            }
            Self::Invalid(e) => Self::Invalid(e.within(prefix)),
        }
    }
}

fn join_path(prefix: &str, field: &str) -> String {
    match (prefix.is_empty(), field.is_empty()) {
        (true, _) => field.to_owned(),
        (false, true) => prefix.to_owned(),
        (false, false) if field.starts_with('[') => format!("{prefix}{field}"),
        (false, false) => format!("{prefix}.{field}"),
    }
}

/// Parses JSON into a wire type, classifying failures as API.md's "Errors" edge says: wrong JSON
/// types are malformed (400); numbers that overflow (`1e999`) are invalid fields (422).
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, InputError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(de).map_err(classify)?;
    Ok(value)
}

/// Turns a path-tracking serde error into an [`InputError`].
pub fn classify(e: serde_path_to_error::Error<serde_json::Error>) -> InputError {
    let path = e.path().to_string();
    let field = (path != ".").then_some(path);
    let inner = e.into_inner();
    let message = inner.to_string();
    if message.starts_with("number out of range") {
        let field = field.unwrap_or_default();
        return InputError::Invalid(FieldError::new(field, "number is out of range"));
    }
    InputError::Malformed { message, field }
}

/// Reads an integer-valued JSON number (`5`, `5.0` and `5e0` alike) into `min..=max`; fractions
/// and overflow are field errors.
pub fn integer(field: &str, n: &serde_json::Number, min: i64, max: i64) -> Result<i64, FieldError> {
    let v = match n.as_i64() {
        Some(v) => v,
        None => {
            let f = n.as_f64().unwrap_or(f64::NAN);
            if f.is_finite() && f.fract() != 0.0 {
                return Err(FieldError::new(field, "must be a whole number"));
            }
            // JSON has one number type: an integral value written as a float (`120.0`, `1e3`,
            // a timestamp a client computed in floating point) is that integer. Only a fraction
            // is refused. `2^63` itself is the first float past `i64::MAX`.
            if !(f.is_finite() && (-9.223_372_036_854_776e18..9.223_372_036_854_776e18).contains(&f)) {
                return Err(FieldError::new(field, format!("must be between {min} and {max}")));
            }
            f as i64
        }
    };
    if v < min || v > max {
        return Err(FieldError::new(field, format!("must be between {min} and {max}")));
    }
    Ok(v)
}

/// Reads a required member, naming it when absent.
pub fn required<T>(field: &str, v: Option<T>) -> Result<T, FieldError> {
    v.ok_or_else(|| FieldError::new(field, "is required"))
}

/// Checks a finite number in `min..=max`.
pub fn number_in(field: &str, v: f64, min: f64, max: f64) -> Result<f64, FieldError> {
    if !v.is_finite() || v < min || v > max {
        return Err(FieldError::new(field, format!("must be a number between {min} and {max}")));
    }
    Ok(v)
}

/// Makes request body types JSON objects only.
///
/// serde's derived `Deserialize` reads a struct from a JSON array as well, taking the elements
/// as the members in declaration order, so `["u-1", 22.5, 114.0, …]` would be a ping. API.md's
/// bodies are objects and only objects (issue 10). For each type named here, which must derive
/// with `#[serde(remote = "Self")]` (that makes the derived `deserialize`/`serialize` inherent
/// functions instead of trait impls), this implements `Deserialize` through `deserialize_map`:
/// an array, like any other non-object, is then a wrong type (`400 malformed_json`) at the path
/// of the value, and an object goes on to the derived code unchanged (unknown members ignored,
/// paths tracked). `serialize:` types also get `Serialize` forwarded to the derived code.
macro_rules! objects_only {
    (serialize: $($ty:ident),+ $(,)?) => {
        $(
            impl serde::Serialize for $ty {
                fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                    $ty::serialize(self, s)
                }
            }
        )+
        $crate::domain::error::objects_only!($($ty),+);
    };
    ($($ty:ident),+ $(,)?) => {
        $(
            impl<'de> serde::Deserialize<'de> for $ty {
                fn deserialize<D: serde::Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
                    struct Object;
                    impl<'de> serde::de::Visitor<'de> for Object {
                        type Value = $ty;
                        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                            f.write_str("a JSON object")
                        }
                        fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<$ty, A::Error> {
                            $ty::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                        }
                    }
                    de.deserialize_map(Object)
                }
            }
        )+
    };
}
pub(crate) use objects_only;
