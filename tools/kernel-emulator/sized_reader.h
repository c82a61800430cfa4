// Reads the reference files examples/kernel_reference.rs writes with `push_sized`: arrays, each
// its length (an f32) and then its values.
#pragma once
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>
struct Reader {
    FILE* f;
    explicit Reader(const std::string& path) : f(fopen(path.c_str(), "rb")) {
        if (!f) { perror(path.c_str()); exit(2); }
    }
    ~Reader() { fclose(f); }
    bool more() { int c = fgetc(f); if (c == EOF) return false; ungetc(c, f); return true; }
    std::vector<float> next() {
        float n;
        if (fread(&n, 4, 1, f) != 1) { printf("short reference file\n"); exit(2); }
        std::vector<float> v((size_t)n);
        if (fread(v.data(), 4, v.size(), f) != v.size()) { printf("short reference file\n"); exit(2); }
        return v;
    }
};
