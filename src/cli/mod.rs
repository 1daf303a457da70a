//! The command line, in two layers (as in ripgrep): [`args`] is what the user
//! typed, flat clap structs; [`command`] converts that once into validated
//! library options. `main.rs` then calls the library and prints.

pub(crate) mod args;
pub(crate) mod command;
pub(crate) mod qemu_img;
