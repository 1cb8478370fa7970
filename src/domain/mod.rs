//! The vocabulary every layer shares: actions and records (`records`), partition ops and their
//! versions (`ops`), partitions and roles (`placement`), and how client input is quoted back
//! (`input`). It imports only the foundations (`ids`), so api, ingest, store, the cluster and the
//! partitions all use it without importing each other.
pub mod input;
pub mod ops;
pub mod placement;
pub mod records;

pub use input::quote;
pub use ops::{LoggedOp, Op, Plan, UserEvent, Version};
pub use placement::{Part, Role};
pub use records::{Action, EventRecord, ItemRecord, ItemRecordV1, UserRecord, UserRecordV1};
