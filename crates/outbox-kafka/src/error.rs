//! The three classes of failure a caller sees, with Kafka's error names.

use std::fmt;

/// Why a record was not delivered.
///
/// `code` and `name` are Kafka's protocol error code and its name as the Java
/// client spells it (`NOT_LEADER_OR_FOLLOWER`, `MESSAGE_TOO_LARGE`, ...).
/// Failures the client detects itself use the Kafka name that fits:
/// `NETWORK_EXCEPTION` (13) for a connection lost mid-request,
/// `REQUEST_TIMED_OUT` (7) for `request_timeout` running out,
/// `MESSAGE_TOO_LARGE` (10) for a record over `max_request_bytes`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProduceError {
    /// Transient: sending the same record again later may succeed.
    Retriable { code: i16, name: &'static str, message: String },
    /// Final for this record (or this configuration): retrying the same
    /// record to the same endpoint will fail the same way.
    Fatal { code: i16, name: &'static str, message: String },
    /// No broker could be reached, a connection or TLS handshake failed, or
    /// metadata could not be obtained: the whole endpoint is down.
    Unreachable { message: String },
}

impl ProduceError {
    /// Kafka's error name, or `"UNREACHABLE"`.
    pub fn name(&self) -> &'static str {
        match self {
            ProduceError::Retriable { name, .. } | ProduceError::Fatal { name, .. } => name,
            ProduceError::Unreachable { .. } => "UNREACHABLE",
        }
    }

    /// Kafka's error code, if there is one.
    pub fn code(&self) -> Option<i16> {
        match self {
            ProduceError::Retriable { code, .. } | ProduceError::Fatal { code, .. } => Some(*code),
            ProduceError::Unreachable { .. } => None,
        }
    }

    pub fn message(&self) -> &str {
        match self {
            ProduceError::Retriable { message, .. }
            | ProduceError::Fatal { message, .. }
            | ProduceError::Unreachable { message } => message,
        }
    }

    pub fn is_fatal(&self) -> bool {
        matches!(self, ProduceError::Fatal { .. })
    }

    pub(crate) fn retriable(code: i16, message: impl Into<String>) -> ProduceError {
        ProduceError::Retriable { code, name: error_name(code), message: bounded(message.into()) }
    }

    pub(crate) fn fatal(code: i16, message: impl Into<String>) -> ProduceError {
        ProduceError::Fatal { code, name: error_name(code), message: bounded(message.into()) }
    }

    pub(crate) fn unreachable(message: impl Into<String>) -> ProduceError {
        ProduceError::Unreachable { message: bounded(message.into()) }
    }

    /// A broker's error code, classified.
    pub(crate) fn from_code(code: i16, message: impl Into<String>) -> ProduceError {
        if is_retriable(code) {
            ProduceError::retriable(code, message)
        } else {
            ProduceError::fatal(code, message)
        }
    }
}

/// The longest message an error keeps, in bytes. A broker's text goes
/// into it (a produce error's message and record errors, a SASL refusal,
/// the mechanisms it offers), and a batch's error is copied to each of its
/// records: 4 MB said to a batch of 500 would be 2 GB.
pub(crate) const MAX_MESSAGE_BYTES: usize = 1024;

/// `message`, cut to `MAX_MESSAGE_BYTES` (at a character's start) with
/// "..." to say so.
fn bounded(mut message: String) -> String {
    if message.len() > MAX_MESSAGE_BYTES {
        let mut end = MAX_MESSAGE_BYTES;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push_str("...");
    }
    message
}

impl fmt::Display for ProduceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProduceError::Retriable { code, name, message } => write!(f, "retriable {name} ({code}): {message}"),
            ProduceError::Fatal { code, name, message } => write!(f, "fatal {name} ({code}): {message}"),
            ProduceError::Unreachable { message } => write!(f, "unreachable: {message}"),
        }
    }
}

impl std::error::Error for ProduceError {}

pub(crate) const UNKNOWN_SERVER_ERROR: i16 = -1;
pub(crate) const NONE: i16 = 0;
pub(crate) const CORRUPT_MESSAGE: i16 = 2;
pub(crate) const UNKNOWN_TOPIC_OR_PARTITION: i16 = 3;
pub(crate) const LEADER_NOT_AVAILABLE: i16 = 5;
pub(crate) const NOT_LEADER_OR_FOLLOWER: i16 = 6;
pub(crate) const REQUEST_TIMED_OUT: i16 = 7;
pub(crate) const MESSAGE_TOO_LARGE: i16 = 10;
pub(crate) const NETWORK_EXCEPTION: i16 = 13;
pub(crate) const RECORD_LIST_TOO_LARGE: i16 = 18;
pub(crate) const NOT_ENOUGH_REPLICAS_AFTER_APPEND: i16 = 20;
pub(crate) const UNSUPPORTED_SASL_MECHANISM: i16 = 33;
pub(crate) const ILLEGAL_SASL_STATE: i16 = 34;
pub(crate) const UNSUPPORTED_VERSION: i16 = 35;
pub(crate) const OUT_OF_ORDER_SEQUENCE_NUMBER: i16 = 45;
pub(crate) const DUPLICATE_SEQUENCE_NUMBER: i16 = 46;
pub(crate) const INVALID_PRODUCER_EPOCH: i16 = 47;
pub(crate) const SASL_AUTHENTICATION_FAILED: i16 = 58;
pub(crate) const UNKNOWN_PRODUCER_ID: i16 = 59;
pub(crate) const FENCED_LEADER_EPOCH: i16 = 74;
pub(crate) const UNSUPPORTED_COMPRESSION_TYPE: i16 = 76;
pub(crate) const PRODUCER_FENCED: i16 = 90;

/// Kafka's name for an error code (org.apache.kafka.common.protocol.Errors).
pub fn error_name(code: i16) -> &'static str {
    match code {
        -1 => "UNKNOWN_SERVER_ERROR",
        0 => "NONE",
        1 => "OFFSET_OUT_OF_RANGE",
        2 => "CORRUPT_MESSAGE",
        3 => "UNKNOWN_TOPIC_OR_PARTITION",
        4 => "INVALID_FETCH_SIZE",
        5 => "LEADER_NOT_AVAILABLE",
        6 => "NOT_LEADER_OR_FOLLOWER",
        7 => "REQUEST_TIMED_OUT",
        8 => "BROKER_NOT_AVAILABLE",
        9 => "REPLICA_NOT_AVAILABLE",
        10 => "MESSAGE_TOO_LARGE",
        11 => "STALE_CONTROLLER_EPOCH",
        12 => "OFFSET_METADATA_TOO_LARGE",
        13 => "NETWORK_EXCEPTION",
        14 => "COORDINATOR_LOAD_IN_PROGRESS",
        15 => "COORDINATOR_NOT_AVAILABLE",
        16 => "NOT_COORDINATOR",
        17 => "INVALID_TOPIC_EXCEPTION",
        18 => "RECORD_LIST_TOO_LARGE",
        19 => "NOT_ENOUGH_REPLICAS",
        20 => "NOT_ENOUGH_REPLICAS_AFTER_APPEND",
        21 => "INVALID_REQUIRED_ACKS",
        22 => "ILLEGAL_GENERATION",
        29 => "TOPIC_AUTHORIZATION_FAILED",
        30 => "GROUP_AUTHORIZATION_FAILED",
        31 => "CLUSTER_AUTHORIZATION_FAILED",
        32 => "INVALID_TIMESTAMP",
        33 => "UNSUPPORTED_SASL_MECHANISM",
        34 => "ILLEGAL_SASL_STATE",
        35 => "UNSUPPORTED_VERSION",
        36 => "TOPIC_ALREADY_EXISTS",
        37 => "INVALID_PARTITIONS",
        38 => "INVALID_REPLICATION_FACTOR",
        39 => "INVALID_REPLICA_ASSIGNMENT",
        40 => "INVALID_CONFIG",
        41 => "NOT_CONTROLLER",
        42 => "INVALID_REQUEST",
        43 => "UNSUPPORTED_FOR_MESSAGE_FORMAT",
        44 => "POLICY_VIOLATION",
        45 => "OUT_OF_ORDER_SEQUENCE_NUMBER",
        46 => "DUPLICATE_SEQUENCE_NUMBER",
        47 => "INVALID_PRODUCER_EPOCH",
        48 => "INVALID_TXN_STATE",
        49 => "INVALID_PRODUCER_ID_MAPPING",
        50 => "INVALID_TRANSACTION_TIMEOUT",
        51 => "CONCURRENT_TRANSACTIONS",
        52 => "TRANSACTION_COORDINATOR_FENCED",
        53 => "TRANSACTIONAL_ID_AUTHORIZATION_FAILED",
        54 => "SECURITY_DISABLED",
        55 => "OPERATION_NOT_ATTEMPTED",
        56 => "KAFKA_STORAGE_ERROR",
        57 => "LOG_DIR_NOT_FOUND",
        58 => "SASL_AUTHENTICATION_FAILED",
        59 => "UNKNOWN_PRODUCER_ID",
        60 => "REASSIGNMENT_IN_PROGRESS",
        72 => "LISTENER_NOT_FOUND",
        74 => "FENCED_LEADER_EPOCH",
        75 => "UNKNOWN_LEADER_EPOCH",
        76 => "UNSUPPORTED_COMPRESSION_TYPE",
        77 => "STALE_BROKER_EPOCH",
        87 => "INVALID_RECORD",
        89 => "THROTTLING_QUOTA_EXCEEDED",
        90 => "PRODUCER_FENCED",
        91 => "RESOURCE_NOT_FOUND",
        _ => "UNKNOWN_ERROR_CODE",
    }
}

/// Whether a produce-path error may go away by itself (Kafka's
/// RetriableException family, plus the idempotence errors the producer
/// recovers from by re-initialising, plus unknown codes: for an outbox, an
/// unknown error must not drop data).
pub(crate) fn is_retriable(code: i16) -> bool {
    !matches!(
        code,
        CORRUPT_MESSAGE
            | UNKNOWN_TOPIC_OR_PARTITION
            | MESSAGE_TOO_LARGE
            | 17 // INVALID_TOPIC_EXCEPTION
            | RECORD_LIST_TOO_LARGE
            | 21 // INVALID_REQUIRED_ACKS
            | 29 // TOPIC_AUTHORIZATION_FAILED
            | 30
            | 31 // CLUSTER_AUTHORIZATION_FAILED
            | 32 // INVALID_TIMESTAMP
            | UNSUPPORTED_SASL_MECHANISM
            | ILLEGAL_SASL_STATE
            | UNSUPPORTED_VERSION
            | 40
            | 42 // INVALID_REQUEST
            | 43 // UNSUPPORTED_FOR_MESSAGE_FORMAT
            | 44 // POLICY_VIOLATION
            | 50
            | 53 // TRANSACTIONAL_ID_AUTHORIZATION_FAILED
            | 54
            | 57
            | SASL_AUTHENTICATION_FAILED
            | UNSUPPORTED_COMPRESSION_TYPE
            | 87 // INVALID_RECORD
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        for code in [UNKNOWN_SERVER_ERROR, LEADER_NOT_AVAILABLE, NOT_LEADER_OR_FOLLOWER, REQUEST_TIMED_OUT, 19, 20, 56]
        {
            assert!(matches!(ProduceError::from_code(code, ""), ProduceError::Retriable { .. }), "{code}");
        }
        for code in [2, 3, 10, 18, 29, 58, 87] {
            assert!(ProduceError::from_code(code, "").is_fatal(), "{code}");
        }
        assert_eq!(ProduceError::from_code(10, "x").name(), "MESSAGE_TOO_LARGE");
        assert_eq!(ProduceError::from_code(6, "x").name(), "NOT_LEADER_OR_FOLLOWER");
        assert_eq!(ProduceError::from_code(87, "x").name(), "INVALID_RECORD");
        assert_eq!(ProduceError::from_code(3, "x").name(), "UNKNOWN_TOPIC_OR_PARTITION");
        assert_eq!(ProduceError::from_code(29, "x").name(), "TOPIC_AUTHORIZATION_FAILED");
        assert_eq!(ProduceError::from_code(-1, "x").name(), "UNKNOWN_SERVER_ERROR");
        assert_eq!(ProduceError::from_code(999, "x").name(), "UNKNOWN_ERROR_CODE");
        assert!(!ProduceError::from_code(999, "x").is_fatal());
    }
}
