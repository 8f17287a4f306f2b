// SPDX-License-Identifier: LGPL-2.1-or-later
// The "otp" GStreamer plugin: otpencrypt and otpdecrypt.
#include <gst/gst.h>

GType otpgate_encrypt_get_type();
GType otpgate_decrypt_get_type();

static gboolean plugin_init(GstPlugin* plugin) {
  return gst_element_register(plugin, "otpencrypt", GST_RANK_NONE, otpgate_encrypt_get_type()) &&
         gst_element_register(plugin, "otpdecrypt", GST_RANK_NONE, otpgate_decrypt_get_type());
}

// Version and origin (where the installed documentation is) come from CMake.
#define PACKAGE "otpgate"
GST_PLUGIN_DEFINE(GST_VERSION_MAJOR, GST_VERSION_MINOR, otp,
                  "One-time pad encryption with keys from QKD (ETSI GS QKD 014)", plugin_init,
                  OTPGATE_VERSION, "LGPL", "otpgate", OTPGATE_PLUGIN_ORIGIN)
