//! Builder images: a bundle is one file identified by one pin (its SHA-256).
//! This module builds bundles from recipes, imports and fetches them into the
//! content-addressed store (plain or as a compressed transport file), and
//! proves a bundle's bytes before anything boots.

pub mod build;
pub mod bundle;
pub mod fetch;
pub mod pin;
pub mod recipe;
pub mod store;
pub mod transport;

pub use pin::Pin;
pub use store::{ImageCheck, OpenImage, Store, StoreError, StoredImage};
