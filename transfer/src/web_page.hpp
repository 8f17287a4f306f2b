// SPDX-License-Identifier: LGPL-2.1-or-later
// The web page for specimen transfers (transfer/web/index.html), compiled into the
// service so that it works offline and needs no files at run time.
#pragma once

#include <string>

namespace otpgate::transfer {
const std::string& web_page();
}
