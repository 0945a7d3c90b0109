//! Offline check of a metadata device (being written; see the API below).
