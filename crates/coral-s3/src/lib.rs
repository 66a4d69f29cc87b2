//! # coral-s3
//!
//! Coral's object-storage store (`S3Store`) for AWS S3 and compatible services, on `object_store`.
