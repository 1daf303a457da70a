//! The one refcount writer (`qdedup::image::refcounts`) on images QEMU made:
//! growing the refcount table (new table, header switched, old table freed) and
//! adding refcount blocks leave an image `qemu-img check` finds clean and whose
//! guest content is unchanged.

mod common;

use common::{assert_qemu_check_clean, create_qcow2, qemu_img, qemu_io, Scratch};
use qdedup::format::header::Header;
use qdedup::image::refcounts::{Refcounts, Stored};

fn header(p: &std::path::Path) -> Header {
    let b = std::fs::read(p).unwrap();
    Header::decode(&b[..Header::ENCODED_LEN]).unwrap()
}

#[test]
fn growing_the_refcount_table_of_a_qemu_image_keeps_it_clean_and_its_content() {
    let s = Scratch::new();
    let mut grown = 0;
    for (cluster_size, refcount_bits) in [("512", "16"), ("512", "1"), ("4096", "64")] {
        let img = create_qcow2(
            s.join(format!("t{cluster_size}-{refcount_bits}.qcow2")),
            Some("4M"),
            &[
                "-o",
                &format!("cluster_size={cluster_size},refcount_bits={refcount_bits}"),
            ],
        );
        qemu_io(&img, &["write -P 0x5a 0 64k", "write -P 0x11 1m 8k"]);
        let copy = s.join(format!("copy{grown}.qcow2"));
        std::fs::copy(&img, &copy).unwrap();
        let before = header(&img);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&img)
            .unwrap();
        let mut r = Refcounts::load(&file, &before).unwrap();
        let entries = r.table().len() as u64;
        r.grow_table(&file, entries + 1).unwrap();
        drop(file);
        let after = header(&img);
        assert_ne!(after.refcount_table_offset, before.refcount_table_offset);
        assert!(
            u64::from(after.refcount_table_clusters) * after.cluster_size() / 8 > entries,
            "the table has more entries"
        );
        assert_qemu_check_clean(&img);
        qemu_img(["compare", img.to_str().unwrap(), copy.to_str().unwrap()]);
        // The old table's clusters are free; QEMU allocates over them again.
        let file = std::fs::File::open(&img).unwrap();
        let mut r = Refcounts::load(&file, &after).unwrap();
        let old = before.refcount_table_offset >> before.cluster_bits;
        assert_eq!(r.get(&file, old).unwrap(), Stored::Count(0));
        drop(file);
        qemu_io(&img, &["write -P 0x77 2m 256k"]);
        assert_qemu_check_clean(&img);
        grown += 1;
    }
    assert_eq!(grown, 3);
}
