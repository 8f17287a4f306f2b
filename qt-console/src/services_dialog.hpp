// SPDX-License-Identifier: LGPL-2.1-or-later
// The services otp-console watches: gateways (status API) and transfer services (job API),
// each with optional HTTP Basic credentials. Kept in QSettings; edited in a dialog that
// opens by itself on a first start and from the Services menu later.
#pragma once

#include <QDialog>
#include <QNetworkAccessManager>
#include <QSettings>
#include <QUrl>

#include "console.hpp"

class QLabel;
class QTableWidget;

namespace otpgate::console {

struct ServiceEntry {
  ServicePoller::Kind kind = ServicePoller::Kind::gateway;
  QUrl url;
  QString user, password;
};

// "services" in the settings; the older "gateways"/"transfers" URL lists are read too.
QList<ServiceEntry> load_services(QSettings& settings);
void save_services(QSettings& settings, const QList<ServiceEntry>& services);
// Empty when `text` is a service URL (http or https, with a host); else why not.
QString url_problem(const QString& text);

class ServicesDialog : public QDialog {
  Q_OBJECT
 public:
  explicit ServicesDialog(const QList<ServiceEntry>& services, QWidget* parent = nullptr);
  QList<ServiceEntry> services() const;
  // Tests and the first start fill rows as an operator would.
  void add_row(const ServiceEntry& entry);
  QTableWidget* table() const { return table_; }
  QLabel* test_result() const { return result_; }
  // Asks the selected row's service (its status or job list) and says what came back.
  void test_connection();
  void accept() override;

 private:
  QTableWidget* table_ = nullptr;
  QLabel* result_ = nullptr;
  QNetworkAccessManager network_;
};

}  // namespace otpgate::console
