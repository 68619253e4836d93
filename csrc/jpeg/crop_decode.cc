// fastmae._jpeg: crop-aware JPEG decoding with libjpeg-turbo's own API (see csrc/README.md).
//
// crop_decode(data, top, left, height, width, scale_denom) decodes only the box
// [top, top + height) x [left, left + width) of the image as scaled by 1/scale_denom
// (libjpeg's DCT-domain scaling) into a uint8 (height, width, 3) RGB tensor:
//   * columns: jpeg_crop_scanline() restricts IDCT, upsampling and colour conversion to the
//     iMCU columns the box touches (it widens the box to iMCU boundaries: trimmed here);
//   * rows above the box: jpeg_skip_scanlines() (entropy-decoded, no IDCT);
//   * rows below the box: never read (jpeg_abort_decompress() after its last row).
// A margin of extra columns/rows around the box (col_margin, row_margin, in output pixels) is
// decoded and trimmed, so that chroma upsampling at the box's edges sees its real neighbours:
// the result equals, bitwise, the same box cut from a full decode (tests/test_data.py).
//
// libjpeg reports errors through error_exit, which by default calls exit(): ours longjmps
// back to the setjmp in run_phase(), whose frame has only trivially destructible locals, and
// the message becomes a C++ exception (a RuntimeError in Python). Warnings are counted, not printed,
// except "premature end of data" inside the rows read (a truncated file): an error. Truncation below
// the box is not seen, since those bytes are never read.
//
// Built as its own small extension (setup.py: jpeg_ext_modules), linked with -ljpeg. The file
// is .cc, not .cpp, so that fastmae._C's csrc/**/*.cpp glob does not compile it in.

#include <torch/extension.h>

#include <csetjmp>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include <jpeglib.h>
#include <jerror.h>  // JWRN_JPEG_EOF

namespace fastmae_jpeg {
namespace {

struct ErrorManager {
  jpeg_error_mgr pub;  // first member: libjpeg hands us a jpeg_error_mgr*
  jmp_buf jump;
  char message[JMSG_LENGTH_MAX];
  long warnings;
};

extern "C" void on_error_exit(j_common_ptr cinfo) {
  auto* err = reinterpret_cast<ErrorManager*>(cinfo->err);
  (*cinfo->err->format_message)(cinfo, err->message);
  longjmp(err->jump, 1);
}

extern "C" void on_emit_message(j_common_ptr cinfo, int msg_level) {
  if (msg_level >= 0) return;  // trace messages
  auto* err = reinterpret_cast<ErrorManager*>(cinfo->err);
  if (cinfo->err->msg_code == JWRN_JPEG_EOF) {  // truncated within the rows read: an error, as Pillow makes it
    (*cinfo->err->format_message)(cinfo, err->message);
    longjmp(err->jump, 1);
  }
  err->warnings++;  // other warnings (e.g. extraneous bytes before a marker): counted, silent
}

extern "C" void on_output_message(j_common_ptr) {}

// What the phases share: plain data only (run_phase longjmps over nothing with a destructor).
struct Job {
  jpeg_decompress_struct cinfo;
  ErrorManager err;
  const unsigned char* data;
  unsigned long size;
  int scale_denom;
  // the box, and the margins, in output (scaled) pixels
  long top, left, height, width, col_margin, row_margin;
  // filled in by the phases
  JDIMENSION crop_x, crop_w;  // the columns libjpeg decodes (after jpeg_crop_scanline)
  long dec_top;               // first decoded row
  unsigned char* line;        // crop_w * 3 bytes (or more)
  unsigned char* out;         // height * width * 3 bytes
  bool created, started;
  char why[256];
};

// Phase 1: header, scale, start, size checks. Phase 2: crop, skip, read the box's rows.
// Returns false with job->err.message or job->why set.
bool run_phase(Job* job, int phase) {
  jpeg_decompress_struct* cinfo = &job->cinfo;
  if (setjmp(job->err.jump)) return false;
  if (phase == 1) {
    cinfo->err = jpeg_std_error(&job->err.pub);
    job->err.pub.error_exit = on_error_exit;
    job->err.pub.emit_message = on_emit_message;
    job->err.pub.output_message = on_output_message;
    jpeg_create_decompress(cinfo);
    job->created = true;
    jpeg_mem_src(cinfo, job->data, job->size);
    jpeg_read_header(cinfo, TRUE);
    if (cinfo->num_components != 1 && cinfo->num_components != 3) {
      std::snprintf(job->why, sizeof(job->why), "crop_decode: %d-component JPEG (only 1 or 3)",
                    cinfo->num_components);
      return false;
    }
    cinfo->out_color_space = JCS_RGB;
    cinfo->scale_num = 1;
    cinfo->scale_denom = static_cast<unsigned int>(job->scale_denom);
    jpeg_start_decompress(cinfo);
    job->started = true;
    const long H = cinfo->output_height, W = cinfo->output_width;
    if (job->top < 0 || job->left < 0 || job->height < 1 || job->width < 1 || job->top + job->height > H ||
        job->left + job->width > W) {
      std::snprintf(job->why, sizeof(job->why),
                    "crop_decode: box (top %ld, left %ld, height %ld, width %ld) outside the %ldx%ld image "
                    "(at scale 1/%d)", job->top, job->left, job->height, job->width, H, W, job->scale_denom);
      return false;
    }
    long x0 = job->left - job->col_margin, x1 = job->left + job->width + job->col_margin;
    x0 = x0 < 0 ? 0 : x0;
    x1 = x1 > W ? W : x1;
    job->crop_x = static_cast<JDIMENSION>(x0);
    job->crop_w = static_cast<JDIMENSION>(x1 - x0);
    if (job->crop_w < static_cast<JDIMENSION>(W)) jpeg_crop_scanline(cinfo, &job->crop_x, &job->crop_w);
    else job->crop_x = 0, job->crop_w = static_cast<JDIMENSION>(W);
    long y0 = job->top - job->row_margin;
    job->dec_top = y0 < 0 ? 0 : y0;
    return true;
  }
  // phase 2
  if (job->dec_top > 0) {
    JDIMENSION skipped = jpeg_skip_scanlines(cinfo, static_cast<JDIMENSION>(job->dec_top));
    if (static_cast<long>(skipped) != job->dec_top) {
      std::snprintf(job->why, sizeof(job->why), "crop_decode: skipped %u rows of %ld", skipped, job->dec_top);
      return false;
    }
  }
  const long dx = static_cast<long>(job->left) - static_cast<long>(job->crop_x);
  const size_t row_bytes = static_cast<size_t>(job->width) * 3;
  const long end = job->top + job->height;
  for (long y = job->dec_top; y < end;) {
    JSAMPROW row = job->line;
    JDIMENSION got = jpeg_read_scanlines(cinfo, &row, 1);
    if (got != 1) {
      std::snprintf(job->why, sizeof(job->why), "crop_decode: no data at row %ld", y);
      return false;
    }
    if (y >= job->top) std::memcpy(job->out + (y - job->top) * row_bytes, job->line + dx * 3, row_bytes);
    y++;
  }
  return true;
}

struct Cleanup {  // destroys the decompressor however we leave (jpeg_destroy never calls error_exit)
  Job* job;
  ~Cleanup() {
    if (job->created) jpeg_destroy_decompress(&job->cinfo);  // also aborts a started decompression
  }
};

[[noreturn]] void fail(const Job& job) {
  std::string msg = job.why[0] ? job.why : std::string("libjpeg: ") + job.err.message;
  throw std::runtime_error(msg);
}

}  // namespace

torch::Tensor crop_decode(const torch::Tensor& data, int64_t top, int64_t left, int64_t height, int64_t width,
                          int64_t scale_denom, int64_t col_margin, int64_t row_margin) {
  TORCH_CHECK(data.device().is_cpu() && data.scalar_type() == torch::kUInt8 && data.dim() == 1,
              "crop_decode: data must be a 1-D uint8 CPU tensor (the file's bytes)");
  TORCH_CHECK(scale_denom == 1 || scale_denom == 2 || scale_denom == 4 || scale_denom == 8,
              "crop_decode: scale_denom must be 1, 2, 4 or 8, got ", scale_denom);
  TORCH_CHECK(col_margin >= 0 && row_margin >= 0, "crop_decode: margins must be >= 0");
  TORCH_CHECK(data.numel() > 0, "crop_decode: empty data");
  torch::Tensor bytes = data.contiguous();
  auto job_holder = std::make_unique<Job>();
  Job* job = job_holder.get();
  std::memset(job, 0, sizeof(Job));
  job->data = bytes.data_ptr<uint8_t>();
  job->size = static_cast<unsigned long>(bytes.numel());
  job->scale_denom = static_cast<int>(scale_denom);
  job->top = top, job->left = left, job->height = height, job->width = width;
  job->col_margin = col_margin, job->row_margin = row_margin;
  Cleanup cleanup{job};
  if (!run_phase(job, 1)) fail(*job);
  torch::Tensor out = torch::empty({height, width, 3}, torch::kUInt8);
  std::vector<unsigned char> line(static_cast<size_t>(job->crop_w) * 3 + 64);
  job->line = line.data();
  job->out = out.data_ptr<uint8_t>();
  if (!run_phase(job, 2)) fail(*job);
  jpeg_abort_decompress(&job->cinfo);  // rows below the box are never decoded
  return out;
}

}  // namespace fastmae_jpeg

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastmae._jpeg: crop-aware JPEG decoding with libjpeg-turbo (csrc/jpeg/crop_decode.cc)";
  m.def("crop_decode", &fastmae_jpeg::crop_decode, "Decode a box of a JPEG into uint8 (height, width, 3) RGB",
        pybind11::arg("data"), pybind11::arg("top"), pybind11::arg("left"), pybind11::arg("height"),
        pybind11::arg("width"), pybind11::arg("scale_denom") = 1, pybind11::arg("col_margin") = 16,
        pybind11::arg("row_margin") = 16,
        pybind11::call_guard<pybind11::gil_scoped_release>());  // threads may decode in parallel
  m.attr("LIBJPEG_VERSION") = JPEG_LIB_VERSION;
#ifdef LIBJPEG_TURBO_VERSION_NUMBER
  m.attr("LIBJPEG_TURBO_VERSION") = LIBJPEG_TURBO_VERSION_NUMBER;
#endif
}
