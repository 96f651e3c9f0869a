// CRC-32C (Castagnoli, polynomial 0x1EDC6F41, reflected 0x82F63B78), the
// checksum of iSCSI, ext4 and most storage formats; loom uses it for dataset
// shards and checkpoint files.
//
// Incremental: crc32c(b, crc32c(a)) == crc32c(a + b), and crc32c({}) == 0.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>

namespace loom {

// Uses the SSE4.2 crc32 instruction when the CPU has it (checked at run
// time), else a portable slicing-by-8 table.
uint32_t crc32c(std::span<const std::byte> data, uint32_t crc = 0);

// CRC-32C of a whole file, read in 1 MiB chunks. Throws BadInput when the
// file cannot be opened, std::runtime_error when reading it fails.
uint32_t crc32c_file(const std::string& path);

// 8 lowercase hexadecimal digits, as loom's files and messages write a CRC.
std::string crc32c_hex(uint32_t crc);

namespace detail {
// The portable table implementation alone, so tests can compare it with the
// hardware path on machines that have one.
uint32_t crc32c_portable(std::span<const std::byte> data, uint32_t crc = 0);
}  // namespace detail

}  // namespace loom
