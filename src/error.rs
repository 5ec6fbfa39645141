//! One error type for the library. Messages say what was wrong and with which input
//! (file, tensor name, shape), so a user can act on them without a debugger.

use crate::tensor::DType;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{op}: shape mismatch: {msg}")]
    Shape { op: &'static str, msg: String },

    #[error("{op}: unsupported dtype {dtype}{hint}")]
    DType {
        op: &'static str,
        dtype: DType,
        hint: String,
    },

    #[error("{path}: {msg}")]
    File { path: String, msg: String },

    #[error("autograd: {0}")]
    Autograd(String),

    #[error("{0}")]
    Msg(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn shape(op: &'static str, msg: impl Into<String>) -> Self {
        Error::Shape {
            op,
            msg: msg.into(),
        }
    }
    pub fn dtype(op: &'static str, dtype: DType) -> Self {
        Error::DType {
            op,
            dtype,
            hint: String::new(),
        }
    }
    pub fn file(path: impl AsRef<std::path::Path>, msg: impl Into<String>) -> Self {
        Error::File {
            path: path.as_ref().display().to_string(),
            msg: msg.into(),
        }
    }
    pub fn msg(msg: impl Into<String>) -> Self {
        Error::Msg(msg.into())
    }
}

/// `bail!(op, "format", args)`: return a shape error from the current function.
#[macro_export]
macro_rules! bail_shape {
    ($op:expr, $($arg:tt)*) => {
        return Err($crate::Error::shape($op, format!($($arg)*)))
    };
}
