//! Helpers shared by the crate's unit tests.

use crate::{FormatOptions, ThinMetadata};
use block_io::MemMetaDevice;
use std::sync::Arc;

/// A freshly formatted pool in memory: 64 KiB data blocks.
pub(crate) fn new_pool(
    nr_meta_blocks: u64,
    nr_data_blocks: u64,
) -> (Arc<MemMetaDevice>, ThinMetadata) {
    let dev = Arc::new(MemMetaDevice::new(nr_meta_blocks));
    let md = ThinMetadata::format(
        dev.clone(),
        FormatOptions {
            data_block_size_sectors: 128,
            nr_data_blocks,
        },
    )
    .expect("format");
    (dev, md)
}
